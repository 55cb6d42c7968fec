"""The README and docs/ say what exists: their links resolve, the files the README names exist, its commands
(and each docs page's first example) compose as the entry points would run them, and the README stays short.

Commands are checked in-process: `python train.py|sample.py ...` (also under torchrun / accelerate launch) is
composed with Hydra and validated against the config schema, as `check_command_line` does before a run;
`python -m vdm.<module> ...` has its arguments parsed by the module's own argparse parser (stopped right after
parsing) or, for the Hydra-style modules, composed; `make <target>` names a Makefile target. `<placeholders>`
become plain words first (a command composes; nothing it names is loaded).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from vdm.build import CONF_DIR
from vdm.config_schema import validate

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 160

# Repository folders and files whose paths the README may name in backticks.
REPO_DIRS = ("vdm", "bench", "conf", "tests", "docs", ".ci")
REPO_FILES = ("train.py", "sample.py", "Makefile", "pyproject.toml")
ENTRY_POINTS = {"train.py": "train", "sample.py": "sample"}
# `python -m` modules that take Hydra overrides of a config, besides a few keys of their own.
HYDRA_MODULES = {"vdm.precompute": ("train", {"out", "shard_size", "overwrite", "device"}),
                 "vdm.sampling.teacache_fit": ("sample", {"degree"})}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(r"<([^<>]*)>")


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def command_lines(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank lines and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def bash_blocks(text: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(text) if lang in ("bash", "sh", "shell", "")]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command of the README's shell blocks and of each docs page's first block."""
    found = []
    for page in PAGES:
        blocks = bash_blocks(read(page))
        for block in blocks if page == README else blocks[:1]:
            found += [(f"{page.relative_to(ROOT)}: {line[:60]}", line) for line in command_lines(block)]
    return found


def words(line: str) -> list[str]:
    """The command's arguments, placeholders such as `runs/<run>` made plain words, trailing comment dropped."""
    plain = PLACEHOLDER.sub(lambda m: re.sub(r"\W+", "-", m.group(1)).strip("-") or "x", line)
    return shlex.split(plain, comments=True)


# --- links, paths, length -------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    missing = []
    for target in LINK.findall(read(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", read(file), re.M)
            if anchor not in {slug(h) for h in headings}:
                missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to what does not exist: {missing}"


def test_readme_names_existing_files():
    named = set()
    for span in CODE_SPAN.findall(read(README)):
        if re.search(r"[\s=<>*]", span) or span.startswith("-"):
            continue
        if span.split("/")[0] in REPO_DIRS and "/" in span or span in REPO_FILES:
            named.add(span)
    assert named, "the README names no repository file in backticks: the pattern is broken"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_readme_is_short():
    lines = len(read(README).splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES} (details go to docs/)"


# --- commands ---------------------------------------------------------------------------------------------------

@functools.cache
def composed(config_name: str, overrides: tuple[str, ...]):
    """The config `overrides` give (cached: the README and the docs repeat some commands)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def jobs(args: list[str]) -> list[list[str]]:
    """The override lists Hydra would run: one per job of a `-m` sweep, else the arguments as they are."""
    multirun = [a for a in args if a in ("-m", "--multirun")]
    overrides = [a for a in args if a not in multirun]
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def check_composes(config_name: str, args: list[str]) -> None:
    flags = [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")]
    assert not flags, f"flags the check does not understand: {flags}"
    for job in jobs(args):
        validate(composed(config_name, tuple(job)), config_name, composed(config_name, ()))


class Parsed(Exception):
    """Raised by the patched argparse right after a successful parse: the command's work never starts."""


def check_argparse(main, args: list[str], monkeypatch, where: str) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [where, *args])
    try:
        main(args) if inspect.signature(main).parameters else main()
    except Parsed:
        return
    except SystemExit as exit_:
        pytest.fail(f"{where} refuses its arguments {args} (exit {exit_.code})")
    pytest.fail(f"{where} returned without parsing arguments with argparse")


def check_module(module: str, args: list[str], monkeypatch) -> None:
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    if module in HYDRA_MODULES:
        config_name, own = HYDRA_MODULES[module]
        check_composes(config_name, [a for a in args if a.partition("=")[0] not in own])
        return
    check_argparse(importlib.import_module(module).main, args, monkeypatch, f"python -m {module}")


def check_script(script: str, args: list[str], monkeypatch) -> None:
    path = ROOT / script
    assert path.is_file(), f"no script {script}"
    if script in ENTRY_POINTS:
        check_composes(ENTRY_POINTS[script], args)
    elif path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        check_argparse(module.main, args, monkeypatch, script)


@functools.cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", read(ROOT / "Makefile"), re.M))


def check_command(argv: list[str], monkeypatch) -> None:
    program, rest = Path(argv[0]).name, argv[1:]
    if program == "make":
        unknown = [t for t in rest if not t.startswith("-") and "=" not in t and t not in make_targets()]
        assert not unknown, f"no Makefile target {unknown}"
    elif program.startswith("python") and rest[:1] == ["-m"]:
        check_module(rest[1], rest[2:], monkeypatch)
    elif program.startswith("python") and rest[:1] == ["-c"]:
        return  # Python code: architecture.md's example, not a command line
    elif program.startswith("python") or program in ("torchrun", "accelerate", "bash"):
        for flag, value in zip(rest, rest[1:]):  # launch configs named by the launcher
            if flag == "--config_file":
                assert (ROOT / value).is_file(), f"no launch config {value}"
        i = next((i for i, a in enumerate(rest) if a.endswith((".py", ".sh"))), None)
        assert i is not None, f"no script in {argv}"
        check_script(rest[i], rest[i + 1:], monkeypatch)
    else:
        pytest.fail(f"a command the docs test does not know how to check: {argv[0]}")


@pytest.mark.parametrize("where, line", documented_commands(), ids=[w for w, _ in documented_commands()])
def test_documented_command_parses(where, line, monkeypatch):
    check_command(words(line), monkeypatch)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_jobs_compose(monkeypatch):
    """`make run` and `make eval-multiprompt` pass overrides that `train.py` / `sample.py` accept."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make test
    dry = subprocess.run(["make", "-n", "-s", "run", "eval-multiprompt"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    lines = [line for line in command_lines(dry) if re.search(r"\b(train|sample)\.py\b", line)]
    assert len(lines) >= 4, dry
    for line in lines:
        check_command(shlex.split(line), monkeypatch)
