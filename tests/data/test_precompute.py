"""vdm.precompute + PrecomputedLatents: shards equal the first stage's and conditioner's outputs, read back,
and a latent_input=true training run works on them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors import safe_open

from tests.conftest import TINY_NETWORK
from vdm.build import compose
from vdm.data.latents import PrecomputedLatents
from vdm.data.video_folder import VideoFolder
from vdm.data.video_io import write_mp4
from vdm.precompute import main as precompute_main
from vdm.training.loop import train

CAPTIONS = ["a red square moving right", "a blue circle moving up", "a green square moving down",
            "a yellow circle moving left"]
DATA = ["data=video_folder", "data.num_frames=9", "data.height=32", "data.width=32"]


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(video folder, latents folder): 4 clips of 12 frames (32x32) plus one corrupt, in shards of 3."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_mp4(root / f"{i}.mp4", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    (root / "bad.mp4").write_bytes(b"corrupt" * 100)
    lines = [json.dumps({"caption": c, "video": f"{i}.mp4"}) for i, c in enumerate(CAPTIONS)]
    lines.append(json.dumps({"caption": "unreadable", "video": "bad.mp4"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("latents")
    precompute_main([*DATA, f"data.root={root}", f"out={out}", "shard_size=3"])
    return root, out


def test_shards_hold_the_first_stage_and_conditioner_outputs(latents_dir):
    root, out = latents_dir
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [3, 1] and index["num_samples"] == 4
    assert index["counts"] == {"listed": 5, "unreadable": 1, "written": 4}
    assert index["latent_shape"] == [48, 9, 8, 8] and index["crossattn_shape"] == [8, 384]
    assert index["first_stage"]["model"]["_target_"] == "vdm.first_stage.PixelShuffleStage"

    cfg = compose([*DATA, f"data.root={root}"], config_name="train")
    dataset = VideoFolder(root, num_frames=9, height=32, width=32)
    first_stage, conditioner = instantiate(cfg.first_stage.model), instantiate(cfg.conditioner).eval()
    latents, crossattn, captions = [], [], []
    for shard in index["shards"]:
        with safe_open(str(out / shard["file"]), framework="pt") as f:
            latents.append(f.get_tensor("latents"))
            crossattn.append(f.get_tensor("crossattn"))
            captions += json.loads(f.metadata()["captions"])
    latents, crossattn = torch.cat(latents), torch.cat(crossattn)
    assert captions == CAPTIONS
    videos = torch.stack([dataset[i]["mp4"] for i in range(4)])
    assert torch.equal(latents, first_stage.encode(rearrange(videos, "b t c h w -> b c t h w")))  # unscaled
    with torch.no_grad():
        expected = conditioner({"txt": CAPTIONS})["crossattn"]
    assert torch.allclose(crossattn, expected, atol=1e-5)

    ds = PrecomputedLatents(out)
    assert len(ds) == 4
    item = ds[3]
    assert set(item) == {"mp4", "txt", "crossattn"} and item["txt"] == CAPTIONS[3]
    assert torch.equal(item["mp4"], latents[3]) and torch.equal(item["crossattn"], crossattn[3])


def test_latent_input_training_runs_on_the_shards(latents_dir, tmp_path):
    _, out = latents_dir
    cfg = compose(TINY_NETWORK + ["data=latents", f"data.root={out}", "latent_input=true", "max_steps=2",
                                  "batch_size=2", "video_every=0", f"runs_root={tmp_path}", "run_name=x",
                                  "sampler.verbose=false", "scheduler.warmup_steps=1"], config_name="train")
    final = train(cfg, tmp_path / "x")
    assert (final / "model.safetensors").is_file() and final.name == "step-2"


def test_errors(latents_dir, tmp_path):
    root, out = latents_dir
    with pytest.raises(FileExistsError, match=r"is not empty; pass overwrite=true"):
        precompute_main([*DATA, f"data.root={root}", f"out={out}"])
    with pytest.raises(FileNotFoundError, match=r"holds neither prompts.txt \+ videos.txt"):  # the dataset's own error
        precompute_main([*DATA, f"data.root={tmp_path}", f"out={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match=r"index.json does not exist; write the folder with"):
        PrecomputedLatents(tmp_path)
    (tmp_path / "index.json").write_text("{\"format\": \"vdm.precomputed_latents\"}")
    with pytest.raises(ValueError, match=r"index.json has no key 'version'"):
        PrecomputedLatents(tmp_path)
    # data=latents checks the run's first stage against the one that encoded the latents
    cfg = compose(["data=latents", f"data.root={out}", "latent_input=true", "first_stage.model.factor=2"],
                  config_name="train")
    with pytest.raises(InstantiationException, match=r"latents come from first_stage.model .* \(differs in \['factor'\]\)"):
        instantiate(cfg.data)


def test_overwrite_replaces_the_shards(latents_dir, tmp_path):
    root, _ = latents_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00007.safetensors").write_bytes(b"stale")
    precompute_main([*DATA, f"data.root={root}", f"out={out}", "shard_size=4", "overwrite=true"])
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors"]
    assert len(PrecomputedLatents(out)) == 4
