"""One error type for what a user got wrong: the entry points print a `UserError` as one line and exit 2;
anything else is a bug and keeps its traceback (before, a KeyError or ValueError from a bug became one line)."""

import subprocess
import sys
from pathlib import Path

import pytest

from vdm.errors import AlreadyExists, BadInput, NotFound, UserError

ROOT = Path(__file__).resolve().parents[1]

# run an entry point with one of its functions replaced by a bug that raises a built-in error
BUGGY = """
import runpy, sys
import {module} as m
def bug(*args, **kwargs):
    raise {error}("a programming error")
m.{function} = bug
sys.argv = [{script!r}, *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def run_with_bug(script: str, argv: list[str], module: str, function: str, error: str):
    code = BUGGY.format(module=module, function=function, error=error, script=script, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, argv, module, function, error", [
    ("sample.py", ["prompts=x"], "vdm.sampling.run", "read_prompts", "KeyError"),
    ("sample.py", ["prompts=x"], "vdm.sampling.run", "read_prompts", "TypeError"),
    ("train.py", ["max_steps=1"], "vdm.training.loop", "check_train_config", "ValueError"),
])
def test_a_bug_keeps_its_traceback(tmp_path, script, argv, module, function, error):
    result = run_with_bug(script, [*argv, f"runs_root={tmp_path}"], module, function, error)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and f"in bug\n{error}: " in result.stderr  # where it was raised
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_user_error_is_one_line_and_exit_2(tmp_path):
    result = run_with_bug("sample.py", ["prompts=x", f"runs_root={tmp_path}"], "vdm.sampling.run", "read_prompts",
                          "__import__('vdm.errors').errors.BadInput")
    assert result.returncode == 2 and result.stderr.strip() == "error: a programming error"


def test_user_errors_are_the_builtin_errors_they_stand_for():
    assert issubclass(BadInput, ValueError) and issubclass(NotFound, FileNotFoundError)
    assert issubclass(AlreadyExists, FileExistsError)
    assert all(issubclass(e, UserError) for e in (BadInput, NotFound, AlreadyExists))
    from vdm.config_schema import ConfigError
    from vdm.training.guard import TrainingDiverged
    assert issubclass(ConfigError, UserError) and issubclass(TrainingDiverged, UserError)
