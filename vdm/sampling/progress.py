"""An unfinished sampling job's record in its output folder, from which `resume=true` finishes it.

`<output_dir>/.unfinished/` holds `job.json` (the job's options, written before any video) and, per finished
unit of work (a batch of single-prompt videos, an edit pair, a multi-prompt video), `<unit>.json` with its
samples.jsonl rows, written after the unit's files. When every unit is done, the rows become samples.jsonl
(written once, atomically, in job order) and the folder goes. A unit without its record is done again from
the start, after its leftover files are removed: resuming gives the files an unbroken job would have.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from vdm.atomic import atomic_path
from vdm.errors import BadInput
from vdm.sampling.output import write_jsonl

log = logging.getLogger(__name__)
RECORD = ".unfinished"


class Progress:
    def __init__(self, out: Path):
        self.out = out
        self.dir = out / RECORD

    @property
    def interrupted(self) -> bool:
        return (self.dir / "job.json").is_file()

    @property
    def complete(self) -> bool:
        return (self.out / "samples.jsonl").is_file()

    def check_resumable(self, options: dict) -> None:
        """Refuse to finish a job started with other options (the first differing key is named)."""
        started = json.loads((self.dir / "job.json").read_text())
        options = json.loads(json.dumps(options))  # as job.json holds them
        key = _first_difference(started, options)
        if key is not None:
            raise BadInput(f"resume=true: {self.out} was started with {key}={_get(started, key)!r}, this run gives "
                           f"{key}={_get(options, key)!r}; resume with the job's own options")

    def done(self, unit: str) -> bool:
        return (self.dir / f"{unit}.json").is_file()

    def start(self, options: dict) -> None:
        """Record the job's options before any video is written (kept as they are on a resume)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.interrupted:
            with atomic_path(self.dir / "job.json") as tmp:
                tmp.write_text(json.dumps(options, indent=1, sort_keys=True))

    def record(self, unit: str, rows: list[dict]) -> None:
        """The unit's rows, once all of its files are written."""
        with atomic_path(self.dir / f"{unit}.json") as tmp:
            tmp.write_text(json.dumps(rows))

    def finish(self, units: list[str]) -> None:
        """samples.jsonl from every unit's rows (sorted by file: job order), then the record goes."""
        rows = [row for unit in units for row in json.loads((self.dir / f"{unit}.json").read_text())]
        rows.sort(key=lambda r: r["file"])  # single-prompt videos were sampled first, batched
        write_jsonl(rows, self.out / "samples.jsonl")
        shutil.rmtree(self.dir)
        log.info("wrote %d videos and samples.jsonl to %s", len(rows), self.out)


def remove_leftovers(paths: list[Path]) -> None:
    """A unfinished unit's files and folders, before it is done again."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _get(options: dict, key: str):
    for part in key.split("."):
        options = options.get(part) if isinstance(options, dict) else None
    return options


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".")
