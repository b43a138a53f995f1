"""Planted-bug check: does the test suite catch plausible bugs?

    python -m tests.plant_bugs                 # every bug, a table at the end
    python -m tests.plant_bugs --list          # the bugs and the tests each one runs
    python -m tests.plant_bugs --only ln-eps gelu-tanh
    python -m tests.plant_bugs --markdown benchmarks/results/planted_bugs.md

Each bug in :data:`tests.planted_bugs.BUGS` is one small edit of the library or
the trainer (a wrong constant, an off-by-one, a swapped axis, a dropped term).
For each, a scratch copy of the tracked tree gets the edit, the tests that
should notice it run there (``pytest -x``), and the copy is restored before the
next bug. A bug is *caught* when pytest reports a failing test; *survived* when
every selected test passes; *stale* when the text it edits is no longer in the
file (the bug list must follow the code, so a stale entry fails the run).

Run on demand, not in CI: it runs a slice of the suite once per bug (minutes).
The Triton kernels run in the interpreter (``TRITON_INTERPRET=1`` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Bug:
    """One planted bug: replace ``old`` by ``new`` in ``path``, then run ``tests``."""

    name: str
    area: str            # kernels | reference | wiring | loop | checkpoints | data | ...
    path: str            # relative to the repository root
    old: str             # must occur exactly once in the file
    new: str
    tests: tuple         # pytest node ids or files, relative to the root
    why: str = ""        # what a user would see if it shipped (and, if accepted, why)
    accepted: bool = False   # a known survivor the suite need not catch (``why`` says why)


@dataclass
class Outcome:
    bug: Bug
    status: str          # caught | survived | stale | error
    seconds: float
    detail: str = ""


def tracked_files(root: str) -> list[str]:
    """The files git tracks plus the untracked ones it does not ignore (work in progress)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p})


def make_scratch(root: str) -> str:
    """A copy of the tracked tree (plus any built extension) in a fresh temporary folder."""
    dst = tempfile.mkdtemp(prefix="heba-plant-")
    for rel in tracked_files(root):
        src = os.path.join(root, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
    kern = os.path.join(root, "heba_kernels")
    for name in os.listdir(kern):
        if name.startswith("_C") and name.endswith(".so"):
            shutil.copy2(os.path.join(kern, name), os.path.join(dst, "heba_kernels", name))
    return dst


def run_bug(bug: Bug, scratch: str, timeout: float) -> Outcome:
    target = os.path.join(scratch, bug.path)
    if not os.path.isfile(target):
        return Outcome(bug, "stale", 0.0, f"{bug.path} does not exist")
    with open(target) as f:
        original = f.read()
    n = original.count(bug.old)
    if n != 1:
        return Outcome(bug, "stale", 0.0, f"the text to edit occurs {n} times in {bug.path}")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=scratch, OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", *bug.tests]
    t0 = time.time()
    try:
        with open(target, "w") as f:
            f.write(original.replace(bug.old, bug.new))
        try:
            proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(bug, "error", time.time() - t0, f"timed out after {timeout:.0f} s")
    finally:
        with open(target, "w") as f:
            f.write(original)
    dt = time.time() - t0
    tail = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if proc.returncode == 1:
        return Outcome(bug, "caught", dt, tail[0] if tail else "a test failed")
    if proc.returncode == 0:
        return Outcome(bug, "survived", dt, proc.stdout.strip().splitlines()[-1]
                       if proc.stdout.strip() else "")
    # 2: interrupted (e.g. a collection error: the edit broke an import), 4/5: usage, no tests.
    last = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 2 and tail:
        return Outcome(bug, "caught", dt, tail[0])
    return Outcome(bug, "error", dt, f"pytest exit {proc.returncode}: {last[-1] if last else ''}")


def markdown(outcomes: list[Outcome], note: str = "") -> str:
    caught = sum(o.status == "caught" for o in outcomes)
    accepted = sum(o.status == "survived" and o.bug.accepted for o in outcomes)
    title = f"# Planted bugs: {caught} of {len(outcomes)} caught"
    if accepted:
        title += f" ({accepted} accepted survivor{'s' * (accepted > 1)})"
    lines = [title, "",
             "`python -m tests.plant_bugs` (tests/planted_bugs.py): one bug at a time in a "
             "scratch copy, its tests run with `pytest -x` under TRITON_INTERPRET=1."
             + (f" {note}" if note else ""), "",
             "| bug | area | file | status | s | first failure / note |",
             "|---|---|---|---|---:|---|"]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|")[:140]
        status = o.status + (" (accepted)" if o.status == "survived" and o.bug.accepted else "")
        lines.append(f"| {o.bug.name} | {o.bug.area} | `{o.bug.path}` | {status} | "
                     f"{o.seconds:.0f} | {detail} |")
    areas = sorted({o.bug.area for o in outcomes})
    lines += ["", "| area | caught | total |", "|---|---:|---:|"]
    for area in areas:
        mine = [o for o in outcomes if o.bug.area == area]
        lines.append(f"| {area} | {sum(o.status == 'caught' for o in mine)} | {len(mine)} |")
    rest = [o for o in outcomes if o.status != "caught"]
    if rest:
        lines += ["", "Not caught:", ""]
        lines += [f"- **{o.bug.name}** ({o.status}): {o.bug.why}" for o in rest]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tests.planted_bugs import BUGS
    p = argparse.ArgumentParser(prog="python -m tests.plant_bugs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the bugs and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these bugs")
    p.add_argument("--area", nargs="+", metavar="AREA", help="run only the bugs of these areas")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per bug")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--results", metavar="JSON",
                   help="keep every bug's last outcome in JSON (updated by each run, so a "
                        "rerun --only of a few bugs refreshes their rows); the table then "
                        "shows every bug of the list recorded there")
    args = p.parse_args(argv)
    names = [b.name for b in BUGS]
    if len(set(names)) != len(names):
        print("plant_bugs: error: duplicate bug names", file=sys.stderr)
        return 2
    bugs = BUGS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"plant_bugs: error: --only: unknown bug(s) {', '.join(unknown)}",
                  file=sys.stderr)
            return 2
        bugs = [b for b in BUGS if b.name in args.only]
    if args.area:
        bugs = [b for b in bugs if b.area in args.area]
    if args.list:
        for b in bugs:
            print(f"{b.name:28s} {b.area:12s} {b.path}  ->  {' '.join(b.tests)}")
        return 0
    head = _head()
    scratch = make_scratch(ROOT)
    outcomes = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so that the scratch goes
    try:
        for i, bug in enumerate(bugs, 1):
            o = run_bug(bug, scratch, args.timeout)
            outcomes.append(o)
            print(f"[{i}/{len(bugs)}] {o.status:8s} {bug.name} ({o.seconds:.0f} s) {o.detail}",
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    note = ""
    if args.results:
        outcomes, commits = _merge_results(args.results, outcomes, BUGS, head)
        note = f"Outcomes recorded at commit(s) {', '.join(commits)} of the tree."
    table = markdown(outcomes, note)
    print("\n" + table)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0 if all(_expected(o) for o in outcomes) else 1


def _head() -> str:
    """The commit of the tree the bugs are planted in (``+`` if it has uncommitted changes)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return git("rev-parse", "--short", "HEAD").strip() + ("+" if dirty else "")


def _merge_results(path: str, outcomes: list, bugs: list, head: str) -> tuple:
    """Update ``path`` with this run's outcomes; return ``(outcomes, commits)``: every bug of
    ``bugs`` recorded there, in list order (an entry whose edit has changed since it was
    recorded is left out), and the commits they were recorded at."""
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    for o in outcomes:
        saved[o.bug.name] = dict(status=o.status, seconds=round(o.seconds, 1),
                                 detail=o.detail, commit=head, old=o.bug.old, new=o.bug.new)
    with open(path, "w") as f:
        json.dump(saved, f, indent=1, sort_keys=True)
    kept = [b for b in bugs if b.name in saved
            and (saved[b.name]["old"], saved[b.name]["new"]) == (b.old, b.new)]
    commits = sorted({saved[b.name]["commit"] for b in kept})
    return [Outcome(b, saved[b.name]["status"], saved[b.name]["seconds"],
                    saved[b.name]["detail"]) for b in kept], commits


def _expected(o: Outcome) -> bool:
    return o.status == "caught" or (o.status == "survived" and o.bug.accepted)


if __name__ == "__main__":
    sys.exit(main())
