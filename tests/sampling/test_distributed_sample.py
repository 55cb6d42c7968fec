"""A prompts file over 2 processes (`torchrun sample.py`, gloo on the CPU) writes the files of one process;
a job whose process is killed leaves no samples.jsonl, and `resume=true` finishes it as if never stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sample import trained_run
from vdm.build import compose
from vdm.distributed import Processes
from vdm.sampling import run as sampling_run
from vdm.sampling import sample
from vdm.sampling.jobs import Job, Unit, check_processes, owners
from vdm.sampling.progress import RECORD

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
LINES = ["a red square moving right", "a blue circle moving up", "a green square moving left",
         "a red circle moving down", "a red square moving right | a red square moving down | a blue circle moving up"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.mktemp("distributed"))


def options(run_dir: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [f"checkpoint={run_dir}", f"prompts_file={prompts}", f"output_dir={out}", "save_latents=true",
            "sampler.verbose=false", *extra]


def in_process(overrides: list[str], processes: Processes | None = None) -> Path:
    return sample(compose(overrides, config_name="sample"), processes=processes)


def torchrun(overrides: list[str], env: dict | None = None, processes: int = 2) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 sample.py ...` (--standalone: on a free port)."""
    return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), "sample.py",
                             *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def stop_after_videos(monkeypatch, n: int) -> None:
    """Sampling stops (KeyboardInterrupt) as it is about to write its (n+1)-th video; `monkeypatch.undo()` ends it."""
    real_write, written = sampling_run.write_video, []

    def write_then_stop(*args, **kwargs):
        if len(written) == n:
            raise KeyboardInterrupt
        written.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(sampling_run, "write_video", write_then_stop)


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_two_processes_write_the_files_of_one(run_dir, tmp_path):
    """Batches dealt to processes, a multi-prompt video split between them: the same bytes, samples.jsonl too."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LINES) + "\n")
    multi = ["steps=4", "batch_size=2", "overlap_size=6", "control_options={start_step:1,end_step:3}"]  # KV-sharing
    job = torchrun(options(run_dir, prompts, tmp_path / "two", *multi))
    one = in_process(options(run_dir, prompts, tmp_path / "one", *multi))
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    expected = files(one)
    assert len(expected) == 12 and files(tmp_path / "two") == expected  # 5 mp4s, 5 latents, samples.jsonl, index.html
    assert not (tmp_path / "two" / RECORD).exists()


def worker_pid(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` whose environment holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"VDM_TEST_JOB={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_killed_job_leaves_no_samples_jsonl_and_resumes_to_the_same_files(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{line} {i}" for i in range(2) for line in LINES[:4]) + "\n")  # 8 videos
    out = tmp_path / "killed"
    job = torchrun(options(run_dir, prompts, out, "steps=8", "batch_size=1"), {"VDM_TEST_JOB": str(out)})
    deadline = time.monotonic() + 240
    while not (out / RECORD / "sample_0001.json").exists():  # rank 1's first video is done
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.01)
    os.kill(worker_pid(str(out), rank=1), signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0  # the other process stopped too
    assert not (out / "samples.jsonl").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4") if (out / RECORD / f"{p.stem}.json").exists()}
    assert "sample_0001.mp4" in kept and len(kept) < 8

    with pytest.raises(FileExistsError, match="holds an interrupted job; resume=true finishes it"):
        in_process(options(run_dir, prompts, out, "steps=8", "batch_size=1"))
    with pytest.raises(ValueError, match="was started with steps=8, this run gives steps=4"):
        in_process(options(run_dir, prompts, out, "steps=4", "batch_size=1", "resume=true"))
    resumed = in_process(options(run_dir, prompts, out, "steps=8", "batch_size=1", "resume=true"))
    unbroken = in_process(options(run_dir, prompts, tmp_path / "unbroken", "steps=8", "batch_size=1"))
    assert files(resumed) == files(unbroken) and len(files(resumed)) == 18
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # finished videos were not redone
    assert not (out / RECORD).exists()
    assert in_process(options(run_dir, prompts, out, "steps=8", "batch_size=1", "resume=true")) == out  # done


def test_more_processes_than_work_is_refused(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LINES[:3]) + "\n")
    with pytest.raises(ValueError, match=r"3 processes for 3 videos in 2 batches of batch_size=2 \(or edit pairs\): "
                                         r"launch at most 2 processes, or give batch_size=1"):
        in_process(options(run_dir, prompts, tmp_path / "a", "batch_size=2"), Processes(0, 3))
    with pytest.raises(ValueError, match=r"4 processes for 3 videos .*: launch at most 2 processes$"):
        in_process(options(run_dir, prompts, tmp_path / "a", "batch_size=2"), Processes(0, 4))
    prompts.write_text(LINES[4] + "\n")  # 3 prompts, no transitions: 3 segments, 2 pairs
    with pytest.raises(ValueError, match=r"3 processes share a multi-prompt video of 3 segments \(2 pairs\): "
                                         "launch at most 2 processes"):
        in_process(options(run_dir, prompts, tmp_path / "b"), Processes(0, 3))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_units_are_dealt_round_robin_and_shared_ones_written_in_turn():
    jobs = [Job(["a red square moving right"], "base", 42 + i, f"sample_{i:04d}") for i in range(5)]
    units = [Unit([jobs[0]]), Unit([jobs[1]]), Unit([jobs[2]], shared=True), Unit([jobs[3]]), Unit([jobs[4]], shared=True)]
    assert owners(units, 2) == [0, 1, 0, 0, 1]
    check_processes(units[:2], 2, batch_size=1)  # one each
    check_processes(units[2:3], 8, batch_size=1)  # every process shares a multi-prompt video
