"""Run by `torchrun --nproc_per_node 2` in test_distributed: train, then dump this rank's weights."""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from tests.conftest import TINY_NETWORK
from vdm.build import compose
from vdm.training import loop


def main(runs_root: str) -> None:
    cfg = compose(TINY_NETWORK + [f"runs_root={runs_root}", "run_name=ddp", "batch_size=2", "max_steps=3",
                                  "log_every=1", "video_every=0", "checkpoint.every=null", "sampler.verbose=false"],
                  config_name="train")
    captured = {}
    real_build = loop.build_engine

    def build_and_keep(*args, **kwargs):
        captured["engine"] = real_build(*args, **kwargs)
        return captured["engine"]

    loop.build_engine = build_and_keep
    run_dir = Path(runs_root) / "ddp"
    loop.train(cfg, run_dir)
    rank = int(__import__("os").environ["RANK"])
    state = {k: v.contiguous() for k, v in captured["engine"].network.state_dict().items()}
    save_file(state, run_dir / f"rank-{rank}.safetensors")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
