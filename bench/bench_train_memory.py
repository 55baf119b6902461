"""Peak RSS of the train stage against the dataset's size: a streamed latent cache (#13).

For each ``--samples`` size, synthetic latent shards in the latent stage's layout
(`_synthetic.synthetic_shards`: SD-1.5 shapes at 512 px, 4x64x64 fp32 ``mean``/``logvar`` per
sample, 77x768 text outputs once per distinct caption, ``--captions`` of them, 1000 samples per
shard, ``.sha256`` sidecars) are trained on by the real ``lorapipe.train.train`` in a fresh
interpreter: a small UNet with SD-1.5's latent and text shapes (`_synthetic.SD15_SMALL_UNET`,
cross-attention 768, tiny widths, so it runs on a CPU), fp32, batch 4, a handful of steps,
``latent_cache_ram_mb: 0`` (streamed, batches made ahead). The child's peak RSS (VmHWM) is the
figure; its RSS after importing torch, diffusers and lorapipe.train is reported beside it.

``--in-memory`` sizes also run with the cache decoded into memory (``latent_cache_ram_mb`` above
the cache's size), for contrast. The shards are written under ``--work`` (default under /tmp; free
space is checked first) and deleted afterwards unless ``--keep``.

    python bench/bench_train_memory.py --samples 1000 20000 --json OUT [--in-memory 1000]

OUT gets ``{"<samples>": peak_rss_bytes}`` (streamed runs); bench/out/bench_train_memory.json
every figure. Goal (#13): the larger set's peak within 15 % of the smaller's.

``--text-cache-probe N``: N samples with a caption each, read once through a streamed
`LatentCache` (no training): how much its LRU of decoded text members (4096 entries) keeps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402
from _common import load_average, out_dir, table, write_result  # noqa: E402

GIB = 2**30


def shard_bytes_estimate(samples: int, shape: _synthetic.Shape, captions: int) -> int:
    """Bytes the shards will take (latents fp32 x2 per sample, plus headers and texts)."""
    c, h, w = shape.latent
    per_sample = 2 * 4 * c * h * w + 3 * 1024
    per_text = 4 * shape.text[0] * shape.text[1] + 1024
    shards = -(-samples // 1000)
    return samples * per_sample + shards * (min(captions, 1000) + 1) * per_text


def check_space(work: Path, need: int) -> None:
    """Refuse to start when ``work``'s file system has less than twice ``need`` free."""
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    print(f"shards need ~{need / GIB:.2f} GiB; {free / GIB:.1f} GiB free in {work}", flush=True)
    if free < 2 * need:
        sys.exit(f"not enough free space in {work}: {free / GIB:.1f} GiB < 2 x {need / GIB:.2f}")


def one_run(args, model: Path, shards: list[str], samples: int, in_memory: bool) -> dict:
    """One train() child on ``shards``; its figures plus what it was."""
    settings = {
        "batch_size": args.batch,
        "max_steps": args.steps,
        "save_steps": args.steps + 1,  # no checkpoint: the loop and the cache alone
        "mixed_precision": "no",
        "compile": False,
        "lora_rank": 8,
        "lora_alpha": 8,
        "latent_cache_ram_mb": 10**7 if in_memory else 0,
        "prefetch": "auto",
    }
    spec = {"run": settings, "model": str(model), "shards": shards,
            "out": str(out_dir() / "train_memory" / f"run-{samples}-{int(in_memory)}")}  # fmt: skip
    mode = "in memory" if in_memory else "streamed"
    print(f"  {samples} samples, {mode} ...", flush=True)
    r = _synthetic.run_train_child(spec, timeout=args.timeout)
    r.update(samples=samples, mode=mode, shard_bytes=sum(Path(p).stat().st_size for p in shards))
    if "error" in r:
        print(f"    {r['error']}\n{r.get('stderr_tail', '')}", flush=True)
    else:
        print(f"    peak RSS {r['peak_rss_bytes'] / GIB:.3f} GiB "
              f"(before train {r['rss_before_train_bytes'] / GIB:.3f}), "
              f"{r['images_per_s_steady']:.2f} img/s", flush=True)  # fmt: skip
    return r


def probe_child(shards: list[str]) -> dict:
    """RSS of a streamed `LatentCache` before and after every sample's tensors were read once
    (an epoch's reads, in key order): what its LRUs of decoded members keep."""
    from lorapipe.latent_cache import LatentCache

    cache = LatentCache(shards, ram_mb=0)
    before = _synthetic.proc_status("VmRSS")
    for s in cache.samples:
        s["text"], s["mean"]
    after = _synthetic.proc_status("VmRSS")
    texts = len(cache._texts.data)
    cache.close()
    return {"samples": len(cache.samples), "rss_after_index_bytes": before,
            "rss_after_epoch_bytes": after, "text_lru_entries": texts}  # fmt: skip


def text_cache_probe(args, n: int) -> dict:
    """`probe_child` in a fresh interpreter on ``n`` samples with a caption each (SD-1.5 shapes)."""
    import subprocess

    shards = _synthetic.synthetic_shards(args.work / f"unique-{n}", n, _synthetic.SHAPES["sd15"],
                                         captions=n)  # fmt: skip
    cmd = [sys.executable, __file__, "--probe-child", *shards]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["shard_bytes"] = sum(Path(x).stat().st_size for x in shards)
    grown = (r["rss_after_epoch_bytes"] - r["rss_after_index_bytes"]) / GIB
    print(f"text-cache probe, {n} samples with a caption each: RSS +{grown:.3f} GiB over one "
          f"pass, {r['text_lru_entries']} text entries kept", flush=True)  # fmt: skip
    if not args.keep:
        shutil.rmtree(args.work / f"unique-{n}")
    return r


def main() -> None:
    """Shards per size, a streamed (and an in-memory) run on each, then the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--json", type=Path, default=None, help='write {"<samples>": peak_rss_bytes}')
    ap.add_argument("--in-memory", type=int, nargs="*", default=None,
                    help="sizes also run in memory (default: the smallest; no value: none)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--captions", type=int, default=8, help="distinct captions (template-like)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lorapipe-bench-train-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the shards for a rerun")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--text-cache-probe", type=int, default=0, metavar="N",
                    help="also: RSS of a streamed cache read once, N samples, N captions")
    ap.add_argument("--probe-child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_child:
        print(json.dumps(probe_child(args.probe_child)))
        return
    in_memory = [min(args.samples)] if args.in_memory is None else args.in_memory
    shape = _synthetic.SHAPES["sd15"]
    n_probe = args.text_cache_probe
    check_space(args.work, sum(shard_bytes_estimate(n, shape, args.captions)
                               for n in set(args.samples) | set(in_memory))
                + shard_bytes_estimate(n_probe, shape, n_probe))  # fmt: skip
    model = _synthetic.model_folder(out_dir() / "train_memory", "sd15-small")
    runs = []
    try:
        for n in sorted(set(args.samples) | set(in_memory)):
            shards = _synthetic.synthetic_shards(args.work / f"set-{n}", n, shape,
                                                 captions=args.captions)  # fmt: skip
            print(f"{n} samples: {len(shards)} shards, load average {load_average()}", flush=True)
            if n in args.samples:
                runs.append(one_run(args, model, shards, n, in_memory=False))
            if n in in_memory:
                runs.append(one_run(args, model, shards, n, in_memory=True))
            if not args.keep:
                shutil.rmtree(args.work / f"set-{n}")
        probe = text_cache_probe(args, n_probe) if n_probe else None
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    report(args, runs, probe)


def report(args, runs: list[dict], probe: dict | None) -> None:
    """The table, the OUT file and bench/out/bench_train_memory.json."""
    ok = [r for r in runs if "error" not in r]
    streamed = {r["samples"]: r["peak_rss_bytes"] for r in ok if r["mode"] == "streamed"}
    rows = [{
        "samples": r["samples"], "cache": r["mode"], "shards GiB": r["shard_bytes"] / GIB,
        "peak RSS GiB": r.get("peak_rss_bytes", 0) / GIB,
        "RSS before train GiB": r.get("rss_before_train_bytes", 0) / GIB,
        "peak - before GiB": (r.get("peak_rss_bytes", 0) - r.get("rss_before_train_bytes", 0))
        / GIB,
        "img/s": r.get("images_per_s_steady"), "error": r.get("error"),
    } for r in runs]  # fmt: skip
    print(table(rows))
    ratio = None
    if len(streamed) >= 2:
        lo, hi = min(streamed), max(streamed)
        ratio = streamed[hi] / streamed[lo]
        verdict = "within" if ratio <= 1.15 else "NOT within"
        print(f"streamed peak RSS, {hi} vs {lo} samples: x{ratio:.3f} ({verdict} the 15 % goal)")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in sorted(streamed.items())}) + "\n")
        print(f"wrote {args.json}")
    write_result("bench_train_memory", {"ratio_largest_vs_smallest": ratio,
                                        "unet_config": _synthetic.SD15_SMALL_UNET,
                                        "steps": args.steps, "batch": args.batch,
                                        "captions": args.captions, "runs": runs,
                                        "text_cache_probe": probe})  # fmt: skip


if __name__ == "__main__":
    main()
