"""Run a benchmark of this tree and of an earlier commit side by side, in one run.

For a change that must not cost speed (issue 14's restructuring: "within 10%"):
the earlier commit is unpacked into a temporary directory (``git archive``),
each tree gets a throwaway virtual environment that sees the same installed
packages as this one but imports the station from its own tree, and the two
run the same benchmark script (each tree's own copy) in alternating rounds, so
drift on a shared machine falls on both. Prints each rate's median per tree and
the ratio new/old.

    python bench/against_commit.py --base 3e81757 --bench ledger -- --count 1000 --no-pg
    python bench/against_commit.py --base 3e81757 --bench http_issuance -- --duration 5
    python bench/against_commit.py --base 3e81757 --new c7ea7ef --bench ledger -- --no-pg
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Only the figures of the benchmarks' own JSON that say how fast something went.
RATE_SUFFIXES = ("_per_s", "per_second", "rate")
# What `make bench` runs when no benchmark arguments are given: a short run.
DEFAULT_EXTRA = {
    "ledger": ["--count", "500", "--no-pg", "--no-writer-estimate", "--export-count", "1000"],
    "http_issuance": ["--duration", "5"],
}


def unpack(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def shim_venv(tree: Path, where: Path) -> Path:
    """A venv whose ``station`` is ``tree``'s and whose other packages are this one's."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    purelib = Path(
        sysconfig.get_paths(vars={"base": str(where), "platbase": str(where)})["purelib"]
    )
    ours = sysconfig.get_paths()["purelib"]
    # Lines of a .pth are appended to sys.path in order; the .pth files inside
    # `ours` (this tree's editable install among them) are not processed.
    (purelib / "_station_tree.pth").write_text(f"{tree}\n{ours}\n")
    return where / "bin" / "python"


def numbers(figures: object, prefix: str = "") -> dict[str, float]:
    """Every rate in a benchmark's JSON, by its path (list items by their index,
    or by their ``clients``/``level`` when they say which load they were)."""
    out: dict[str, float] = {}
    if isinstance(figures, dict):
        items: list[tuple[str, object]] = [(str(k), v) for k, v in figures.items()]
    elif isinstance(figures, list):
        items = []
        for i, value in enumerate(figures):
            label = str(i)
            if isinstance(value, dict):
                for key in ("clients", "level", "name"):
                    if key in value:
                        label = f"{key}={value[key]}"
                        break
            items.append((label, value))
    else:
        return out
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict | list):
            out.update(numbers(value, name + "."))
        elif isinstance(value, int | float) and name.endswith(RATE_SUFFIXES):
            out[name] = float(value)
    return out


def run(python: Path, tree: Path, bench: str, extra: list[str]) -> dict[str, float]:
    script = tree / "bench" / f"{bench}.py"
    done = subprocess.run(
        [str(python), str(script), "--json", *extra],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stderr[-3000:]}")
    start = done.stdout.index("{")
    return numbers(json.loads(done.stdout[start:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default="HEAD~1", help="the earlier commit, any git revision (default HEAD~1)"
    )
    parser.add_argument("--new", help="compare with this git revision instead of the working tree")
    parser.add_argument("--bench", default="ledger", help="bench/NAME.py to run (default ledger)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("extra", nargs="*", help="arguments for the benchmark (after --)")
    args = parser.parse_args()
    # `--json` after `--` (as tests/test_bench_smoke.py passes it) is ours too.
    args.json = args.json or "--json" in args.extra
    extra = [a for a in args.extra if a != "--json"] or DEFAULT_EXTRA.get(args.bench, [])

    with tempfile.TemporaryDirectory(prefix="bench-against-") as tmp:
        work = Path(tmp)
        old_tree = unpack(args.base, work / "old")
        new_tree = ROOT if args.new is None else unpack(args.new, work / "new")
        trees = {"old": old_tree, "new": new_tree}
        pythons = {name: shim_venv(tree, work / f"venv-{name}") for name, tree in trees.items()}
        results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                results[name].append(run(pythons[name], trees[name], args.bench, extra))

    keys = sorted(set(results["old"][0]) & set(results["new"][0]))
    rows = []
    for key in keys:
        old = statistics.median(r[key] for r in results["old"])
        new = statistics.median(r[key] for r in results["new"])
        rows.append({"figure": key, "old": old, "new": new, "ratio": new / old if old else None})
    if args.json:
        summary = {"base": args.base, "new": args.new, "bench": args.bench, "figures": rows}
        print(json.dumps(summary, indent=2))
        return 0
    new_name = "this tree" if args.new is None else args.new
    print(f"bench/{args.bench}.py, {args.base} (old) against {new_name} (new), ")
    print(f"medians of {args.rounds} alternating rounds")
    width = max(len(r["figure"]) for r in rows) if rows else 10
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(
            f"  {row['figure']:<{width}}  old {row['old']:10.1f}  new {row['new']:10.1f}  {ratio}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
