"""`cfg_parallel=true` under `torchrun --nproc_per_node 2` (gloo on the CPU): each process evaluates one guidance
branch of every video, all_gather brings both to both; the latents equal one process's within 1e-5 in float32 on
a 2B-like (sin-cos) and a 5B-like (RoPE) folder, and one process writes the files."""

import json

import pytest
from safetensors.torch import load_file

from tests.cogvideox_folder import make_cogvideox_folder
from tests.sampling.test_distributed_sample import in_process, torchrun
from vdm.distributed import Processes

PROMPTS = "a red square moving right\na blue circle moving up\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg_parallel")
    (root / "prompts.txt").write_text(PROMPTS)
    return root, {v: make_cogvideox_folder(root / v, v) for v in ("2b", "5b")}


def options(folder, prompts, out, *extra):
    guider = [] if any(e.startswith("guider=") for e in extra) else ["guider=cfg", "cfg=6"]
    return [f"pretrained={folder}", f"prompts_file={prompts}", f"output_dir={out}", "steps=4", "sampler=ddim",
            *guider, "batch_size=1", "save_latents=true", "sampler.verbose=false", *extra]


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_two_processes_one_branch_each_give_one_process_latents(folders, tmp_path, variant):
    root, by_variant = folders
    folder, prompts = by_variant[variant], root / "prompts.txt"
    job = torchrun(options(folder, prompts, tmp_path / "two", "cfg_parallel=true"))
    one = in_process(options(folder, prompts, tmp_path / "one"))
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    rows = {json.loads(line)["file"]: json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()}
    two = {json.loads(line)["file"] for line in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()}
    assert two == set(rows) and len(rows) == 2
    for row in rows.values():
        a, b = (load_file(folder_ / row["latent"])["latent"] for folder_ in (one, tmp_path / "two"))
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


@pytest.mark.parametrize("extra, world, message", [
    (["cfg_parallel=true"], 1, r"cfg_parallel=true puts the conditional and unconditional branches on two processes; "
                               r"this job has 1"),
    (["cfg_parallel=true", "cache=first_block"], 2, r"cfg_parallel=true with cache=first_block"),
    (["cfg_parallel=true", "mode=edit"], 2, r"cfg_parallel=true samples single-prompt videos for now"),
    (["cfg_parallel=true", "guider=none"], 2, r"cfg_parallel=true needs guidance"),
])
def test_combinations_that_cannot_work_are_refused(folders, tmp_path, extra, world, message):
    root, by_variant = folders
    (tmp_path / "pair.txt").write_text("a red square moving right | a blue circle moving up\n")
    prompts = tmp_path / "pair.txt" if "mode=edit" in extra else root / "prompts.txt"
    with pytest.raises(ValueError, match=message):
        in_process(options(by_variant["2b"], prompts, tmp_path / "out", *extra), Processes(rank=0, world_size=world))
    assert not (tmp_path / "out").exists()


def test_each_process_evaluates_its_branch_rows_only():
    """GuidedDenoiser with two branch processes: process r's model sees CFG's rows of branch r alone, and the
    gathered D is the one of the whole batch (the other process's half stood in by the full evaluation here)."""
    import torch

    from vdm.diffusion.guiders import VanillaCFG
    from vdm.diffusion.samplers import GuidedDenoiser, Step

    def model(x, a, cond, step_idx=None, timesteps=None):
        seen.append(cond["crossattn"][:, 0, 0].tolist())
        return x * cond["crossattn"][:, :1, :1, None, None] + a.view(-1, 1, 1, 1, 1)

    class Half(Processes):
        def gather(self, local, counts):  # the other branch's rows, as the other process computes them
            full = model(x_in, a_in, cond_in)
            blocks = self.blocks(sum(counts))
            mine = slice(blocks[self.rank].start, blocks[self.rank].stop)
            assert torch.equal(full[mine], local)
            return full

    x = torch.randn(1, 2, 3, 4, 4)
    cond, uc = {"crossattn": torch.full((1, 5, 8), 2.0)}, {"crossattn": torch.full((1, 5, 8), 0.5)}
    guider = VanillaCFG(scale=6.0)
    step = Step(idx=1, num_steps=4, a=0.5, timestep=500)
    x_in, a_in, cond_in = guider.prepare_inputs(x, torch.full((1,), 0.5), cond, uc)
    seen = []
    whole = GuidedDenoiser(model, guider, cond, uc)(x, step)
    for rank, expected in ((0, [0.5]), (1, [2.0])):  # [uc..., c...]: rank 0 the unconditional branch
        seen.clear()
        split = GuidedDenoiser(model, guider, cond, uc, branches=Half(rank=rank, world_size=2))(x, step)
        assert seen[0] == expected and torch.equal(split, whole)
