"""One video on several processes under `torchrun --nproc_per_node 2` (gloo on the CPU): `cfg_parallel=true` (each
process evaluates one guidance branch, all_gather brings both to both) and `ulysses=2` (each process holds half
of every call's tokens, all-to-all trades them for half the heads around attention). The latents equal one
process's within 1e-5 in float32 on a 2B-like (sin-cos) and a 5B-like (RoPE) folder, with a step cache deciding
alike on both processes, for edit pairs and multi-prompt videos; one process writes the files."""

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


def compare_jobs(one, two) -> list[dict]:
    """The records of one process's job, whose files the two-process job wrote alike (latents within 1e-5)."""
    rows = {json.loads(line)["file"]: json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()}
    others = {json.loads(line)["file"]: json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()}
    assert set(others) == set(rows) and rows
    for name, row in rows.items():
        assert others[name].get("cache") == row.get("cache")  # the same steps computed, the same blocks run
        a, b = (load_file(folder_ / row["latent"])["latent"] for folder_ in (one, two))
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, name
    return list(rows.values())


FBC = ["cache=first_block", "cache.threshold=1.0", "steps=8"]  # computes some of the 8 steps, skips others


@pytest.mark.parametrize("variant, extra", [
    pytest.param("2b", ["cfg_parallel=true"], marks=pytest.mark.slow),  # the 2B-like network: the edit case below
    ("5b", ["cfg_parallel=true", *FBC]),
    ("5b", ["ulysses=2", *FBC]),
], ids=["cfg-2b", "cfg-5b-first_block", "ulysses-5b-first_block"])
def test_two_processes_give_one_process_latents(folders, tmp_path, variant, extra):
    root, by_variant = folders
    folder, prompts = by_variant[variant], root / "prompts.txt"
    job = torchrun(options(folder, prompts, tmp_path / "two", *extra))
    alone = [e for e in extra if not e.startswith(("cfg_parallel", "ulysses"))]
    one = in_process(options(folder, prompts, tmp_path / "one", *alone))
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    rows = compare_jobs(one, tmp_path / "two")
    assert len(rows) == 2
    if alone:  # the cache skipped steps on both processes alike
        assert all(0 < r["cache"]["computed_steps"] < r["cache"]["steps"] for r in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["cfg_parallel=true", "ulysses=2", *FBC], ["ulysses=2"]],
                         ids=["cfg_parallel-x-ulysses", "two-groups-of-ulysses"])
def test_four_processes_compose_branches_shards_and_prompt_sharding(folders, tmp_path, extra):
    """4 processes: one group of 2 branches x 2 token shards per video, or 2 groups of 2 shards that take one
    video each; the latents are one process's."""
    root, by_variant = folders
    folder, prompts = by_variant["5b"], root / "prompts.txt"
    job = torchrun(options(folder, prompts, tmp_path / "four", *extra), processes=4)
    alone = [e for e in extra if not e.startswith(("cfg_parallel", "ulysses"))]
    one = in_process(options(folder, prompts, tmp_path / "one", *alone))
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    assert len(compare_jobs(one, tmp_path / "four")) == 2


@pytest.mark.slow  # the network-level pair (KV-sharing over expanded rows) is in tests/networks/test_sequence_parallel.py
def test_an_edit_pair_on_two_token_shards_is_one_process_pair(folders, tmp_path):
    """ulysses=2 on a KV-sharing edit pair (the target row attends with the source's keys and values, the rows
    expanded below the window): both videos equal one process's."""
    root, by_variant = folders
    (tmp_path / "pair.txt").write_text("a red square moving right | a blue circle moving right\n")
    edit = ["mode=edit", "control_options={start_step:1,end_step:4}"]
    job = torchrun(options(by_variant["2b"], tmp_path / "pair.txt", tmp_path / "two", "ulysses=2", *edit))
    one = in_process(options(by_variant["2b"], tmp_path / "pair.txt", tmp_path / "one", *edit))
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert [r["role"] for r in compare_jobs(one, tmp_path / "two")] == ["source", "target"]


@pytest.mark.parametrize("extra, world, message", [
    (["cfg_parallel=true"], 1, r"cfg_parallel=true puts the conditional and unconditional branches on two processes; "
                               r"this job has 1"),
    (["cfg_parallel=true", "mode=edit"], 2, r"cfg_parallel=true samples single-prompt videos for now"),
    (["cfg_parallel=true", "guider=none"], 2, r"cfg_parallel=true needs guidance"),
    (["ulysses=2"], 3, r"ulysses=2 does not divide the job's processes: 3 processes are groups of 2"),
    (["ulysses=2", "cfg_parallel=true"], 2, r"ulysses=2 does not divide the job's processes: 2 processes with "
                                            r"cfg_parallel=true are groups of 4"),
    (["ulysses=0"], 1, r"ulysses=0 must be >= 1"),
    (["ulysses=4"], 4, r"ulysses=4 does not divide the network's 2 attention heads \(network.num_attention_heads\); "
                       r"valid: 1, 2"),
    (["ulysses=2", "control=visualize"], 2, r"ulysses=2 gives each process a share of the attention heads; "
                                            r"visualize reads the attention of every head"),
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
