"""Fit TeaCache's rescaling polynomial for any model (a CogVideoX folder or a vdm run) from uncached sampling.

    python -m vdm.sampling.teacache_fit pretrained=<folder> | checkpoint=<run> prompts='["...", "..."]' | prompts_file=<f> \
        [steps=50] [seed=0] [degree=4] [sample.py options ...]

Each prompt (of `prompts`, or of every line of a prompts file) is sampled alone without a cache; on every call after the first, the relative L1 change of the
time embedding (TeaCache's input) and of the block stack's video output are recorded, and a polynomial of
`degree` is least-squares fitted to output change as a function of input change (numpy.polyfit, highest power
first), as TeaCache calibrated its published CogVideoX coefficients. Prints the coefficients and the options
that use them: `cache=teacache cache.coefficients=[...]`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import numpy as np
import torch

from vdm.errors import BadInput, UserError
from vdm.networks.caches import StepCache

log = logging.getLogger(__name__)
OPTIONS = ("degree",)


class RecordingCache(StepCache):
    """Runs every block and records, per call, the time embedding's and the video output's relative L1 change."""

    name = "record"

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pairs: list[tuple[float, float]] = []

    def blocks(self, run, video, text, emb, timestep):
        out_video, out_text = super().blocks(run, video, text, emb, timestep)
        if self.previous is not None:
            emb0, out0 = self.previous
            self.pairs.append((relative_l1(emb, emb0), relative_l1(out_video, out0)))
        self.previous = (emb, out_video)
        return out_video, out_text


def relative_l1(x: torch.Tensor, previous: torch.Tensor) -> float:
    return ((x - previous).abs().mean() / previous.abs().mean()).item()


def fit(pairs: Sequence[tuple[float, float]], degree: int = 4) -> list[float]:
    """The least-squares polynomial (highest power first) of output change over input change."""
    if len(pairs) <= degree:
        raise BadInput(f"{len(pairs)} recorded steps cannot fit a polynomial of degree {degree}: sample more prompts "
                       "or steps")
    x, y = np.array(pairs, dtype=np.float64).T
    return [float(c) for c in np.polyfit(x, y, degree)]


def record(cfg, prompts: list[str]) -> list[tuple[float, float]]:
    """Uncached sampling of each prompt (the sample config's model, sampler, steps, guidance and seed)."""
    from vdm.sampling.load import latent_shape, load_model, make_sampler
    from vdm.sampling.run import seeded_noise, text_keys

    loaded = load_model(cfg.pretrained, cfg.checkpoint, cfg.runs_root, cfg.use_ema)
    engine = loaded.engine
    sampler = make_sampler(loaded.config, cfg.sampler, cfg.steps, cfg.cfg, cfg.get("guider"), cfg.rescale)
    shape = latent_shape(engine, cfg.num_frames, cfg.height, cfg.width)
    pairs: list[tuple[float, float]] = []
    device = engine.denoiser.alpha_cumprod_sqrt.device
    for i, prompt in enumerate(prompts):
        cond, uc = engine.conditioning({k: [prompt] for k in text_keys(engine)})
        cache = RecordingCache(engine.network.config.num_layers)
        engine.sample_single(cond, uc, seeded_noise((1, *shape), cfg.seed + i, device), sampler=sampler, cache=cache)
        pairs += cache.pairs
    return pairs


def main(argv: Sequence[str] | None = None) -> list[float]:
    from vdm.build import compose
    from vdm.sampling.jobs import read_prompts

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        sys.exit(0)
    degree = 4
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "degree":
            degree = int(value)
            if degree < 1:
                raise BadInput(f"degree={value} must be a positive integer")
        else:
            overrides.append(arg)
    cfg = compose(overrides, config_name="sample")
    prompts = [p for video in read_prompts(cfg) for p in video]  # every prompt its own single video
    pairs = record(cfg, prompts)
    coefficients = fit(pairs, degree)
    print(f"{len(pairs)} steps recorded over {len(prompts)} prompts; fitted (highest power first):")
    print(f"cache=teacache cache.coefficients=[{','.join(f'{c:.8e}' for c in coefficients)}]")
    return coefficients


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
