"""Streamed vs in-memory latent cache, prefetch on vs off: steady images/s and data-wait share of
the real train stage on a CPU (#13).

Each run is ``lorapipe.train.train`` in a fresh interpreter (`_synthetic.run_train_child`), fp32,
batch 4, no compile, no checkpoint, on the same synthetic latent shards (`_synthetic`, the latent
stage's layout, ``--captions`` distinct captions, 1000 samples a shard), in four modes: cache in
memory or streamed (``latent_cache_ram_mb`` 10^7 or 0) x ``prefetch`` true or false. Two model
sizes: ``tiny`` (lorapipe.tiny, the demo's model: 4x8x8 latents, 77x32 text) and ``sd15-small``
(`_synthetic.SD15_SMALL_UNET`: SD-1.5's 4x64x64 latents and 77x768 text at toy widths). Rounds
alternate the order of the modes (ABBA), so load from other processes falls on all of them alike.

Figures per run, from the run's own files: ``images_per_s_steady`` of train_summary.json (images
after the first step over their wall time) and the mean ``data_wait`` of metrics.jsonl over the same
steps (time getting the batch ready / step time). Reported: the median over rounds, and the ratios
streamed / in memory with prefetch as ``auto`` picks it (in memory on a CPU: off; streamed: on) and
like for like, each the median of the ratios within a round. Goals (#13): streamed >= 0.95x in
memory; data wait < 2 % with prefetch.

    python bench/bench_streaming.py [--models tiny,sd15-small] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402
from _common import load_average, median, out_dir, table, write_result  # noqa: E402

MODELS = {  # name: (model folder kind, shapes, default timed steps)
    "tiny": ("tiny", _synthetic.SHAPES["tiny"], 40),
    "sd15-small": ("sd15-small", _synthetic.SHAPES["sd15"], 12),
}
MODES = [("in memory", False), ("in memory", True), ("streamed", True), ("streamed", False)]


def one_run(args, name: str, model: Path, shards: list[str], cache: str, prefetch: bool,
            steps: int, k: int) -> dict:  # fmt: skip
    """One train() child in one mode; its figures."""
    settings = {
        "batch_size": 4, "max_steps": steps, "save_steps": steps + 1, "mixed_precision": "no",
        "compile": False, "lora_rank": 8, "lora_alpha": 8, "prefetch": prefetch,
        "latent_cache_ram_mb": 0 if cache == "streamed" else 10**7,
    }  # fmt: skip
    spec = {"run": settings, "model": str(model), "shards": shards, "threads": args.threads,
            "out": str(out_dir() / "streaming" / f"{name}-{k}")}  # fmt: skip
    r = _synthetic.run_train_child(spec, timeout=args.timeout)
    r.update(model=name, cache=cache, prefetch=prefetch, load_average=load_average())
    if "error" in r:
        print(f"    {cache}, prefetch {prefetch}: {r['error']}\n{r.get('stderr_tail', '')}")
    else:
        print(f"    {cache:9s} prefetch {prefetch!s:5s}: {r['images_per_s_steady']:.2f} img/s, "
              f"data wait {100 * r['data_wait_mean']:.2f} %", flush=True)  # fmt: skip
    return r


def _ratio(runs: list[dict], name: str, a: tuple, b: tuple) -> float | None:
    """Median over rounds of (mode ``a``'s img/s / mode ``b``'s) in the same round."""
    by = {(r["round"], r["cache"], r["prefetch"]): r["images_per_s_steady"] for r in runs
          if r["model"] == name and "error" not in r}  # fmt: skip
    ratios = [by[(k, *a)] / by[(k, *b)] for k in {r["round"] for r in runs}
              if (k, *a) in by and (k, *b) in by]  # fmt: skip
    return median(ratios) if ratios else None


def summarise(runs: list[dict]) -> list[dict]:
    """Median per (model, cache, prefetch) over rounds; ratios against in memory, paired within
    a round (the load changes between rounds more than between the runs of one round)."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        for cache, prefetch in MODES:
            mode = (name, cache, prefetch)
            ok = [r for r in runs
                  if "error" not in r and (r["model"], r["cache"], r["prefetch"]) == mode]
            rows.append({
                "model": name, "cache": cache, "prefetch": prefetch,
                "img/s": median([r["images_per_s_steady"] for r in ok]) if ok else None,
                "per round": [round(r["images_per_s_steady"], 2) for r in ok],
                "vs in memory, same prefetch": _ratio(runs, name, (cache, prefetch),
                                                      ("in memory", prefetch)),
                "vs in memory, auto (off)": _ratio(runs, name, (cache, prefetch),
                                                   ("in memory", False)),
                "data wait %": 100 * median([r["data_wait_mean"] for r in ok]) if ok else None,
            })  # fmt: skip
    return rows


def main() -> None:
    """Every model, every round, every mode (alternating order); the table and JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,sd15-small", help=f"subset of {list(MODELS)}")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="steps per run (tiny 40, sd15 12)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; on this shared 2-core machine two "
                    "threads made steps several times slower and far noisier)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args()
    runs = []
    work = out_dir() / "streaming"
    for name in args.models.split(","):
        kind, shape, steps = MODELS[name]
        model = _synthetic.model_folder(work, kind)
        shards = _synthetic.synthetic_shards(work / f"data-{name}-{args.samples}", args.samples,
                                             shape, captions=args.captions)  # fmt: skip
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            print(f"{name}, round {rnd + 1}: load average {load_average()}", flush=True)
            for k, (cache, prefetch) in enumerate(order):
                runs.append(one_run(args, name, model, shards, cache, prefetch,
                                    args.steps or steps, k))  # fmt: skip
                runs[-1]["round"] = rnd
    rows = summarise(runs)
    print(table(rows))
    write_result("bench_streaming", {"samples": args.samples, "captions": args.captions,
                                     "threads": args.threads, "runs": runs, "summary": rows})


if __name__ == "__main__":
    main()
