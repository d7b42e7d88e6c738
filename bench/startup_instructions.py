"""User-space instructions from exec to `meshcore run` being ready, under callgrind.

The CPU time to ready that bench/startup.py reads moves by ±20 % with the load of a shared
machine; the instruction count moves by well under 1 %, so it is what judges a change of a
few milliseconds. Each source tree (a directory with `meshcore/` and the plugins' packages,
as bench/startup.py's `--compare` takes) starts the sidecar of bench/startup.py's config
(round-robin + retry + breaker, static discovery, uvloop) as `python -P -c <hook>`, where
the hook ends the process as the sidecar writes its "ready to accept" line (after binding
its listeners and starting the mesh); valgrind reports the instructions of all threads.
Rounds interleave the trees; the table gives the median, the spread and the ratio to the
first tree. Needs /usr/bin/valgrind (Debian package valgrind).

    python bench/startup_instructions.py A,B [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from startup import sidecar_config  # noqa: E402

HOOK = """
import os, sys
from meshcore._sidecar import _run
def ready(message):
    if "ready to accept" in message:
        os._exit(0)
    _run.sys.stderr.write(message + "\\n")
_run.echo_error = ready
from meshcore._main import main
main(sys.argv[1:])
"""


def instructions(tree: str, config: Path) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-P", "-c", HOOK, "-c", str(config), "run", "--backend", "uvloop",
           "--log-level", "warning"]
    subprocess.run(cmd, env=env, capture_output=True, timeout=60)  # writes the .pyc files
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
                          env=env, capture_output=True, text=True, timeout=600)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"{tree}: no count; stderr ends:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("trees", help="source trees to compare, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round (well under 2 minutes)")
    args = parser.parse_args()
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    rounds = 1 if args.quick else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="meshcore-instructions-"))
    counts: dict[str, list[int]] = {t: [] for t in trees}
    try:
        config, _ = sidecar_config(tmp, "plain", None)
        for rnd in range(rounds):
            for tree in trees[rnd % len(trees):] + trees[:rnd % len(trees)]:
                counts[tree].append(instructions(tree, config))
            print(f"round {rnd + 1}/{rounds}: "
                  + ", ".join(f"{Path(t).name} {counts[t][-1] / 1e6:.1f}M" for t in trees), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(counts[trees[0]])
    print(f"\n{rounds} interleaved rounds; instructions to ready, median (min-max), ratio to the first")
    for tree in trees:
        c = counts[tree]
        print(f"{tree[-40:]:40} {statistics.median(c) / 1e6:8.1f}M ({min(c) / 1e6:.1f}-{max(c) / 1e6:.1f})"
              f" {statistics.median(c) / base:6.3f}")


if __name__ == "__main__":
    main()
