"""Ulysses sequence parallelism: one network call's tokens split over the processes of a sequence group.

Process s of N holds the s-th contiguous block of the text tokens and the s-th of the video tokens (balanced
blocks, `Processes.blocks`), so every per-token step (adaLN with its text / video experts, the MLP, the
gates) runs on its own tokens alone. Around attention, one all-to-all trades token shards for head shards:
each process then holds every token, in one process's `[text | video]` order, for heads s·h/N..(s+1)·h/N,
so RoPE, the q/k norms and the attention control see exactly the rows a single process sees (for their
heads), and a second all-to-all trades back. The network's output tokens are gathered at the end, so every
process of the group returns the whole output.

Exchanged chunks are padded to the largest shard (all-to-all takes equal shapes); the padding never reaches
a computation. A control that reads the attention of all heads at once (visualisation, mask-guided sharing)
cannot run sharded: the sampling job refuses the combination.
"""

from __future__ import annotations

import torch
from einops import rearrange

from vdm.distributed import Processes
from vdm.errors import BadInput


class SequenceShards:
    """The token shards of one network call over `group` (N processes) for `text_tokens` + `video_tokens`
    tokens and `heads` attention heads (N must divide them)."""

    def __init__(self, group: Processes, text_tokens: int, video_tokens: int, heads: int):
        n = group.world_size
        if heads % n:
            raise BadInput(f"ulysses={n} does not divide the network's {heads} attention heads")
        self.group, self.heads = group, heads
        self.text, self.video = group.blocks(text_tokens), group.blocks(video_tokens)
        self.sizes = [len(t) + len(v) for t, v in zip(self.text, self.video)]  # each process's tokens

    def shard(self, tokens: torch.Tensor, video: bool) -> torch.Tensor:
        """This process's block of `tokens` (B, n, D), the text stream's or (`video`) the video stream's."""
        block = (self.video if video else self.text)[self.group.rank]
        return tokens[:, block.start:block.stop]

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, own tokens, d) -> (B, heads / N, every token, d) in one process's `[text | video]` order."""
        n, longest = self.group.world_size, max(self.sizes)
        chunks = rearrange(self._pad(x, longest), "b (n h) t d -> n b h t d", n=n)  # chunk j: process j's heads
        got = self.group.all_to_all(chunks)  # got[i]: process i's tokens of this process's heads
        text = [got[i][:, :, :len(self.text[i])] for i in range(n)]
        video = [got[i][:, :, len(self.text[i]):self.sizes[i]] for i in range(n)]
        return torch.cat(text + video, dim=2)

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_heads`: (B, heads / N, every token, d) -> (B, heads, own tokens, d)."""
        longest, L = max(self.sizes), self.text[-1].stop
        text, video = y[:, :, :L], y[:, :, L:]
        chunks = torch.stack([self._pad(torch.cat([text[:, :, t.start:t.stop], video[:, :, v.start:v.stop]], dim=2),
                                        longest) for t, v in zip(self.text, self.video)])  # chunk i: process i's
        got = self.group.all_to_all(chunks)  # got[j]: this process's tokens of process j's heads
        return rearrange(got, "n b h t d -> b (n h) t d")[:, :, :self.sizes[self.group.rank]]

    def gather_video(self, video: torch.Tensor) -> torch.Tensor:
        """Every process's video tokens (B, own, P) -> (B, all, P), on every process."""
        whole = self.group.gather(video.transpose(0, 1).contiguous(), [len(v) for v in self.video])
        return whole.transpose(0, 1)

    @staticmethod
    def _pad(x: torch.Tensor, tokens: int) -> torch.Tensor:
        if x.shape[2] == tokens:
            return x
        return torch.cat([x, x.new_zeros(*x.shape[:2], tokens - x.shape[2], *x.shape[3:])], dim=2)
