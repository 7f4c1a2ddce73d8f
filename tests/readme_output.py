"""Check the README's Quick start output block against what the default job prints now, or rewrite it.

    .venv/bin/python tests/readme_output.py            # run configs/default.yaml, diff against the block
    .venv/bin/python tests/readme_output.py --write    # replace the block with what the run printed
    make readme-check                                  # the first, as a make target

The block leaves out what the README says it leaves out (the parent's epoch lines and Ray's start-up
lines); wall times and the run directory's time stamp are compared as placeholders, everything else
(every metric, to the printed digit) must match. It takes as long as `make run` (a few minutes on 2 CPU
cores), so it is a maintainer's check, not part of `make test`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HEADING = "## Quick start"
LEFT_OUT = (re.compile(r"^\[parent\] epoch \d+/"), re.compile(r"^\[workers\] (starting Ray|Ray is up)"),
            re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+INFO "))  # Ray's own log lines
TIMES = re.compile(r"\d+(\.\d+)?s\)")
RUN_DIR = re.compile(r"runs/default-s0-\d{8}-\d{6}")


def block_span(text: str) -> tuple[int, int]:
    """Start and end offsets of the first plain ``` block after the Quick start heading."""
    start = text.index("\n```\n", text.index(HEADING)) + len("\n```\n")
    return start, text.index("```", start)


def shown(output: str, output_dir: str) -> list[str]:
    """The lines of a run's output that the README block shows, its run directory under ``runs/``."""
    lines = [line.rstrip().replace(output_dir, "runs") for line in output.splitlines()]
    return [line for line in lines if line and not any(p.search(line) for p in LEFT_OUT)]


def normalised(lines: list[str]) -> list[str]:
    return [RUN_DIR.sub("runs/<run>", TIMES.sub("<t>s)", line)) for line in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the README block with the new output")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as runs:
        done = subprocess.run([sys.executable, "-m", "evo_subens.cli", "run", "configs/default.yaml",
                               f"output_dir={runs}"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        return done.returncode
    text = README.read_text()
    start, end = block_span(text)
    now = shown(done.stdout, runs)
    if args.write:
        README.write_text(text[:start] + "\n".join(now) + "\n" + text[end:])
        print(f"{README}: Quick start block rewritten ({len(now)} lines)")
        return 0
    written = text[start:end].rstrip("\n").splitlines()
    diff = list(difflib.unified_diff(normalised(written), normalised(now), "README.md", "configs/default.yaml",
                                     lineterm=""))
    print("\n".join(diff) if diff else "README Quick start block matches the default job's output")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
