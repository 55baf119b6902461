"""A no-op rerun planned by two lorapipe trees, alternated (#17: "nothing changed ≤ 2 s").

Each tree (a git revision or a folder) gets its own copy of the workflow, runs the shipped demo
once (`snakemake --cores 2`) and once more to be sure nothing is left to do; then the two run
`snakemake --cores 2` with nothing to do, in turn (ABAB, the order swapped every other pair),
``--pairs`` times. A no-op run's wall time moves by ±0.3 s on a busy 2-core machine, more than
a plan's change: so this reports the median of the paired differences beside each median.

    python bench/bench_noop_ab.py --old 690b19f --new HEAD --pairs 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_dir, write_result  # noqa: E402
from bench_fixed_cost import fresh_copy, materialise, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="a git revision or a folder")
    ap.add_argument("--new", default="HEAD", help="a git revision or a folder")
    ap.add_argument("--pairs", type=int, default=20)
    args = ap.parse_args()
    root = out_dir() / "noop_ab"
    works = {}
    for label in ("old", "new"):
        src = materialise(label, getattr(args, label), root)
        work = fresh_copy(src, root / f"work-{label}")
        first = run(work, [], 2)
        again = run(work, [], 2)
        if again["jobs"]:
            raise SystemExit(f"{label}: a second run still planned {again['planned']}")
        print(f"{label}: demo {first['wall_s']:.1f} s ({first['jobs']} jobs)", flush=True)
        works[label] = work
    walls: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.pairs):
        for label in ("old", "new") if i % 2 == 0 else ("new", "old"):
            r = run(works[label], [], 2)
            if r["jobs"]:
                raise SystemExit(f"{label}: a no-op run planned {r['planned']}")
            walls[label].append(r["wall_s"])
    diffs = [a - b for a, b in zip(walls["old"], walls["new"], strict=True)]
    result = {
        "old": args.old, "new": args.new, "walls": walls,
        "median_s": {k: median(v) for k, v in walls.items()},
        "min_s": {k: min(v) for k, v in walls.items()},
        "median_old_minus_new_s": median(diffs),
        "pairs_new_faster": sum(d > 0 for d in diffs),
    }  # fmt: skip
    for k in walls:
        print(f"{k}: median {result['median_s'][k]:.3f} s, min {result['min_s'][k]:.3f} s")
    print(f"old - new, median of {len(diffs)} pairs: {result['median_old_minus_new_s']:.3f} s "
          f"(new faster in {result['pairs_new_faster']})")  # fmt: skip
    write_result("noop_ab", result)


if __name__ == "__main__":
    main()
