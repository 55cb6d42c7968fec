"""PrecomputedLatents: first-stage latents and caption embeddings written by `python -m vdm.precompute`.

A latents folder holds safetensors shards `shard-00000.safetensors`, ... and `index.json`, written
last, so a folder without it is incomplete. Each shard holds up to `shard_size` samples:
  latents    (N, C, T, h, w)  the first stage's encoding, UNSCALED (the engine multiplies by
                              its scale_factor when `latent_input=true`)
  crossattn  (N, L, D)        the frozen conditioner's text embedding
  first_frame_latent (N, C, 1, h, w)  image-to-video only (`image_to_video=true`): the clip's first frame
                              with SAT's training noise (drawn once, seeded), encoded UNSCALED
and its metadata a JSON list `captions`. `index.json` lists the shards and records the config that
made them (first stage, conditioner, data) and the counts.

Train on them with `data=latents data.root=<folder> latent_input=true`.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch.utils.data import Dataset

from vdm.conditioning.image import FIRST_FRAME_KEY
from vdm.errors import BadInput, NotFound

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT = "vdm.precomputed_latents"
VERSION = 1
LATENTS, CROSSATTN, CAPTIONS = "latents", "crossattn", "captions"
INDEX_KEYS = ("format", "version", "num_samples", "shards", "first_stage", "conditioner")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def read_index(root: Path) -> dict:
    """The checked `index.json` of a latents folder."""
    path = root / INDEX_FILE
    if not path.is_file():
        raise NotFound(f"{path} does not exist; write the folder with `python -m vdm.precompute ... out={root}`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON ({e.msg}); write the folder again with vdm.precompute") from e
    if not isinstance(index, dict):
        raise BadInput(f"{path} holds a {type(index).__name__}; expected a JSON object with keys {list(INDEX_KEYS)}")
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        raise BadInput(f"{path} has no key {missing[0]!r}; an index needs {list(INDEX_KEYS)}")
    if index["format"] != FORMAT or index["version"] != VERSION:
        raise BadInput(f"{path} is format {index['format']!r} version {index['version']}; "
                       f"this reader takes {FORMAT!r} version {VERSION}")
    return index


def _as_dict(value) -> dict:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else dict(value)


class PrecomputedLatents(Dataset):
    """Samples of a latents folder, read lazily from its shards.

    `__getitem__` returns `{input_key: latents (C, T, h, w), text_key: caption, "crossattn": (L, D)}`, and
    `first_frame_latent` (C, 1, h, w) when the folder was written for an image-to-video model.
    `first_stage` (a run's `first_stage.model` config), when given, must equal the one that encoded
    the latents: training on another first stage's latents fails here rather than silently.
    """

    def __init__(self, root: str | os.PathLike, input_key: str = "mp4", text_key: str = "txt",
                 first_stage: Mapping | None = None):
        self.root = Path(root)
        self.input_key, self.text_key = input_key, text_key
        index = read_index(self.root)
        self.index = index
        if first_stage is not None:
            self._check_first_stage(_as_dict(first_stage), index["first_stage"].get("model"))

        self.shards: list[Path] = []
        self.captions: list[str] = []
        self._starts: list[int] = []  # first sample of each shard
        for entry in index["shards"]:
            path = self.root / entry["file"]
            if not path.is_file():
                raise NotFound(f"{self.root / INDEX_FILE} lists shard {entry['file']} but {path} does not exist")
            with safe_open(str(path), framework="pt") as f:
                captions = json.loads((f.metadata() or {}).get(CAPTIONS, "null") or "null")
                rows = {key: f.get_slice(key).get_shape()[0] for key in (LATENTS, CROSSATTN) if key in f.keys()}
            counts = {"index": entry["num_samples"], CAPTIONS: len(captions) if isinstance(captions, list) else None,
                      **rows}
            if len(rows) != 2 or len(set(counts.values())) != 1:
                raise BadInput(f"{path}: sample counts disagree or keys are missing ({counts}); expected "
                               f"{LATENTS}, {CROSSATTN} and metadata {CAPTIONS} of {entry['num_samples']} samples each")
            self._starts.append(len(self.captions))
            self.shards.append(path)
            self.captions.extend(captions)
        if len(self.captions) != index["num_samples"]:
            raise BadInput(f"{self.root / INDEX_FILE}: num_samples={index['num_samples']} but its shards hold "
                           f"{len(self.captions)}")
        if not self.captions:
            raise BadInput(f"{self.root / INDEX_FILE} lists no samples")
        log.info("%s: %d precomputed samples in %d shards", self.root, len(self.captions), len(self.shards))

    def _check_first_stage(self, expected: dict, recorded: dict | None) -> None:
        if expected != recorded:
            keys = sorted(k for k in set(expected) | set(recorded or {})
                          if expected.get(k) != (recorded or {}).get(k))
            raise BadInput(f"{self.root / INDEX_FILE}: its latents come from first_stage.model {recorded} but this "
                           f"run's first_stage.model is {expected} (differs in {keys}); choose the matching "
                           "first_stage or precompute again")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        with safe_open(str(self.shards[shard]), framework="pt") as f:
            latents = f.get_slice(LATENTS)[row:row + 1][0]
            crossattn = f.get_slice(CROSSATTN)[row:row + 1][0]
            first_frame = f.get_slice(FIRST_FRAME_KEY)[row:row + 1][0] if FIRST_FRAME_KEY in f.keys() else None
        item = {self.input_key: latents, self.text_key: self.captions[index], CROSSATTN: crossattn}
        return item if first_frame is None else {**item, FIRST_FRAME_KEY: first_frame}
