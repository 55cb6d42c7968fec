"""Several sampling jobs on one page: their videos matched by prompts, seed and mode, side by side in one row each
(two runs, two step caches, two samplers).

    python -m vdm.eval.gallery <job folder> <job folder> [...] out.html

Each job folder is a sample.py output folder (samples.jsonl, or the records of an unfinished job). The page plays
each job's web copies (web/) where it has them, else its mp4s, linked relative to the page: keep the page where
it can reach the folders. Nothing is fetched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vdm.errors import AlreadyExists, BadInput, NotFound, UserError
from vdm.sampling.gallery import read_job, write_page


def labels(folders: list[Path]) -> list[str]:
    """Each job's name on the page: its folder's name, with its parent's where two names are the same."""
    names = [f.resolve().name for f in folders]
    named = [f"{f.resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names)]
    return [f"{n} ({i + 1})" if named.count(n) > 1 else n for i, n in enumerate(named)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdm.eval.gallery", description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="+", type=Path, help="sample.py output folders (each holding samples.jsonl)")
    parser.add_argument("out", type=Path, help="the page to write, an .html file (never overwritten)")
    args = parser.parse_args(argv)
    try:
        if args.out.suffix.lower() not in (".html", ".htm"):
            raise BadInput(f"{args.out}: the page must be an .html file (the last argument; the others are job folders)")
        if args.out.exists():
            raise AlreadyExists(f"{args.out} already exists; choose another file")
        missing = next((f for f in args.jobs if not f.is_dir()), None)
        if missing is not None:
            raise NotFound(f"{missing} is not a folder; give sample.py output folders")
        jobs = [read_job(folder, label) for folder, label in zip(args.jobs, labels(args.jobs))]
        write_page(args.out, jobs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
