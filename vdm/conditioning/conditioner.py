"""GeneralConditioner: runs a list of embedders over a batch and gathers their outputs by key.

Every embedder is an nn.Module with the attributes
  input_key     the batch key it reads,
  output_key    "crossattn" (B, L, D) | "vector" (B, D) | "concat" (B, T, C, H, W) (e.g.
                `LowResolutionVideo`: the super-resolution latents),
  is_trainable  when False: parameters frozen, always in eval mode, run under torch.no_grad,
  ucg_rate      probability of dropping a sample's condition during training (classifier-free
                guidance dropout): its embedding becomes zeros,
  ucg_value     optional: a dropped sample's *input* is replaced by this value (e.g. "" for text)
                before encoding, instead of zeroing its embedding,
  precomputed_key  optional: a frozen embedder whose batch also holds this key (a tensor, e.g.
                `crossattn` from `python -m vdm.precompute`) is not run; the stored embedding is used.
Embedders sharing an output_key are concatenated: crossattn on the feature dim, vector on dim 1,
concat on the channel dim of (B, T, C, H, W) (where the network concatenates it to x_t).
"""

from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from vdm.errors import BadInput


class GeneralConditioner(nn.Module):
    CAT_DIMS = {"crossattn": -1, "vector": 1, "concat": 2}

    def __init__(self, embedders: Sequence[nn.Module]):
        super().__init__()
        for i, embedder in enumerate(embedders):
            self._check_embedder(i, embedder)
            if not embedder.is_trainable:
                embedder.requires_grad_(False)
                embedder.eval()
        self.embedders = nn.ModuleList(embedders)

    def _check_embedder(self, i: int, embedder: nn.Module) -> None:
        name = f"embedders[{i}] ({type(embedder).__name__})"
        for attr in ("input_key", "output_key", "is_trainable", "ucg_rate"):
            if not hasattr(embedder, attr):
                raise BadInput(
                    f"{name} has no attribute {attr!r}; an embedder needs input_key, output_key, is_trainable, ucg_rate"
                )
        if embedder.output_key not in self.CAT_DIMS:
            raise BadInput(f"{name}.output_key={embedder.output_key!r}; valid: {sorted(self.CAT_DIMS)}")
        if not 0.0 <= embedder.ucg_rate <= 1.0:
            raise BadInput(f"{name}.ucg_rate={embedder.ucg_rate}; must be in [0, 1]")

    def train(self, mode: bool = True) -> "GeneralConditioner":
        super().train(mode)
        for embedder in self.embedders:  # frozen embedders stay in eval mode (no dropout noise)
            if not embedder.is_trainable:
                embedder.eval()
        return self

    def forward(
        self,
        batch: Mapping[str, Any],
        force_zero_embeddings: Collection[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embed a batch; ucg dropout applies only in training mode."""
        return self._embed(batch, force_zero_embeddings or (), self.training, generator)

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping[str, Any],
        batch_uc: Mapping[str, Any] | None = None,
        force_uc_zero_embeddings: Collection[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c, uc) without ucg dropout; embedders reading a key in force_uc_zero_embeddings give zero uc. Without
        `batch_uc`, an embedder whose uc is not zeroed gives c's embedding, computed once (e.g. a VAE encode)."""
        embeddings: dict[int, torch.Tensor] = {}
        c = self._embed(batch_c, (), ucg=False, embeddings=embeddings)
        uc = self._embed(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings or (), ucg=False,
                         embeddings=embeddings if batch_uc is None else None)
        return c, uc

    def _embed(
        self,
        batch: Mapping[str, Any],
        force_zero: Collection[str],
        ucg: bool,
        generator: torch.Generator | None = None,
        embeddings: dict[int, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`embeddings`: each embedder's output by index, filled by a first call and reused by a second one
        on the same batch (no dropout either time)."""
        out: dict[str, torch.Tensor] = {}
        for i, embedder in enumerate(self.embedders):
            key = embedder.output_key
            if embeddings is not None and i in embeddings and embedder.input_key not in force_zero:
                out[key] = torch.cat((out[key], embeddings[i]), self.CAT_DIMS[key]) if key in out else embeddings[i]
                continue
            if embedder.input_key not in batch:
                raise BadInput(
                    f"batch has no key {embedder.input_key!r} (input_key of {type(embedder).__name__}); "
                    f"keys present: {list(batch)}"
                )
            x = batch[embedder.input_key]
            precomputed = getattr(embedder, "precomputed_key", None)
            precomputed = batch.get(precomputed) if precomputed and not embedder.is_trainable else None
            ucg_value = None if precomputed is not None else getattr(embedder, "ucg_value", None)
            drop = (
                self._drop_mask(len(x), embedder.ucg_rate, generator)
                if ucg and embedder.ucg_rate > 0
                else None
            )
            if drop is not None and ucg_value is not None:
                x = _replace(x, drop, ucg_value)
            if isinstance(precomputed, torch.Tensor):  # embeddings stored by `python -m vdm.precompute`
                emb = precomputed.to(embedder.device) if hasattr(embedder, "device") else precomputed
            else:
                with nullcontext() if embedder.is_trainable else torch.no_grad():
                    emb = embedder(x)
            if drop is not None and ucg_value is None:
                drop = drop.to(emb.device).view(-1, *[1] * (emb.dim() - 1))
                emb = torch.where(drop, torch.zeros_like(emb), emb)
            if embedder.input_key in force_zero:
                emb = torch.zeros_like(emb)
            elif embeddings is not None:
                embeddings[i] = emb
            out[key] = torch.cat((out[key], emb), self.CAT_DIMS[key]) if key in out else emb
        return out

    @staticmethod
    def _drop_mask(batch_size: int, rate: float, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        return torch.rand(batch_size, generator=generator, device=device) < rate  # (B,) bool


def _replace(x: Any, drop: torch.Tensor, value: Any) -> Any:
    """x with the samples where drop is True replaced by value (x: a list of items or a tensor)."""
    if isinstance(x, torch.Tensor):
        x = x.clone()
        x[drop.to(x.device)] = value
        return x
    return [value if d else item for item, d in zip(x, drop.tolist())]
