"""pillow-simd vs Pillow: LANCZOS resize throughput (and JPEG decode as a control), one run.

The PIL active in the project's venv is pillow-simd (tools/bootstrap.sh swaps it in). This script
creates, once, a second venv at bench/out/venv-pillow with stock ``pillow==13.0.0`` and runs the
same worker (this file with ``--worker``; it imports nothing but Pillow and the stdlib) in both
interpreters, alternating rounds so that load from other processes hits both alike. The inputs are
seeded images written once as raw RGB; the outputs come back as raw bytes, so the script also
reports how many resized values differ between the two libraries.

    python bench/bench_resize.py [--repeats 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_dir, table, write_result  # noqa: E402

PILLOW_VERSION = "13.0.0"
# (name, source size, target size); the 4:3 case is a landscape photo going to a 512x384 bucket.
CASES = [
    ("lanczos 2048x2048->512x512", (2048, 2048), (512, 512)),
    ("lanczos 1024x768->512x384", (1024, 768), (512, 384)),
]
DECODE = ("jpeg decode 2048x2048 q90", (2048, 2048))


# ---------------------------------------------------------------- worker (runs in both venvs)
def worker(work: Path, repeats: int, tag: str) -> None:
    """Time every case with the PIL of this interpreter; print one JSON line."""
    import PIL
    from PIL import Image

    res = {"pil_version": PIL.__version__, "cases": {}}
    for name, src, dst in CASES:
        img = Image.frombytes("RGB", src, (work / f"in_{src[0]}x{src[1]}.rgb").read_bytes())
        img.resize(dst, Image.LANCZOS)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = img.resize(dst, Image.LANCZOS)
            times.append(time.perf_counter() - t0)
        res["cases"][name] = times
        (work / f"out_{tag}_{dst[0]}x{dst[1]}.rgb").write_bytes(out.tobytes())
    name, src = DECODE
    data = (work / f"in_{src[0]}x{src[1]}.jpg").read_bytes()
    import io

    times = []
    for _ in range(max(3, repeats // 2)):
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        times.append(time.perf_counter() - t0)
    res["cases"][name] = times
    print(json.dumps(res))


# ---------------------------------------------------------------- driver
def pillow_venv(path: Path) -> Path:
    """The python of a venv holding stock Pillow ``PILLOW_VERSION``, created once (cached)."""
    py = path / "bin" / "python"
    check = [str(py), "-c", "import PIL; print(PIL.__version__)"]
    if py.exists():
        got = subprocess.run(check, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip() == PILLOW_VERSION:
            return py
    print(f"creating {path} with pillow=={PILLOW_VERSION} (once) ...", flush=True)
    base = getattr(sys, "_base_executable", None) or "python3"
    subprocess.run([base, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"pillow=={PILLOW_VERSION}",
        ],
        check=True,
    )
    got = subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip()
    if got != PILLOW_VERSION:
        raise RuntimeError(f"{py}: PIL {got}, expected {PILLOW_VERSION}")
    return py


def make_inputs(work: Path) -> None:
    """Seeded test images: smooth gradients plus noise (so resampling has detail to work on)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for _, (w, h), _ in CASES:
        p = work / f"in_{w}x{h}.rgb"
        if p.exists():
            continue
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (np.sin(xx / 37) * np.cos(yy / 23) + 1) * 127])
        noisy = base.transpose(1, 2, 0) + rng.normal(0, 24, (h, w, 3))
        p.write_bytes(np.clip(noisy, 0, 255).astype(np.uint8).tobytes())
    _, (w, h) = DECODE
    jpg = work / f"in_{w}x{h}.jpg"
    if not jpg.exists():
        img = Image.frombytes("RGB", (w, h), (work / f"in_{w}x{h}.rgb").read_bytes())
        img.save(jpg, format="JPEG", quality=90)


def run_worker(py: Path, work: Path, repeats: int, tag: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [
        str(py),
        str(Path(__file__).resolve()),
        "--worker",
        str(work),
        "--repeats",
        str(repeats),
        "--tag",
        tag,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def diff_stats(work: Path) -> dict:
    import numpy as np

    out = {}
    for name, _, (w, h) in CASES:
        a, b = (
            np.frombuffer((work / f"out_{lib}_{w}x{h}.rgb").read_bytes(), np.uint8).astype(int)
            for lib in ("pillow-simd", "pillow")
        )
        d = np.abs(a - b)
        out[name] = {
            "values": int(d.size),
            "differing_fraction": float((d > 0).mean()),
            "max_abs_diff": int(d.max()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed resizes per case per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per interpreter")
    ap.add_argument("--venv", type=Path, default=None, help="stock-Pillow venv (cached)")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.repeats, args.tag)
        return

    out = out_dir()
    work = out / "resize"
    work.mkdir(exist_ok=True)
    interpreters = {
        "pillow-simd": Path(sys.executable),
        "pillow": pillow_venv(args.venv or out / "venv-pillow"),
    }
    make_inputs(work)
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in interpreters}
    versions = {}
    for _ in range(args.rounds):
        for lib, py in interpreters.items():
            res = run_worker(py, work, args.repeats, lib)
            versions[lib] = res["pil_version"]
            for case, times in res["cases"].items():
                samples[lib].setdefault(case, []).extend(times)
    if "post" not in versions["pillow-simd"]:
        print(f"warning: the venv's PIL is {versions['pillow-simd']}, not pillow-simd")
    diffs = diff_stats(work)

    rows, cases = [], {}
    names = [c[0] for c in CASES] + [DECODE[0]]
    for name in names:
        ms = {lib: median(samples[lib][name]) * 1e3 for lib in interpreters}
        ratio = ms["pillow"] / ms["pillow-simd"]
        d = diffs.get(name)
        cases[name] = {
            "median_ms": ms,
            "images_per_s": {lib: 1e3 / v for lib, v in ms.items()},
            "speedup_simd_over_pillow": ratio,
            "samples": {lib: len(samples[lib][name]) for lib in interpreters},
            "output_diff": d,
        }
        rows.append(
            {
                "case": name,
                "simd ms": ms["pillow-simd"],
                "pillow ms": ms["pillow"],
                "simd img/s": 1e3 / ms["pillow-simd"],
                "pillow img/s": 1e3 / ms["pillow"],
                "speedup": ratio,
                "diff values %": None if d is None else 100 * d["differing_fraction"],
                "max |diff|": None if d is None else d["max_abs_diff"],
            }
        )
    print(
        f"PIL: pillow-simd {versions['pillow-simd']} vs Pillow {versions['pillow']}; "
        f"median of {args.rounds}x{args.repeats} per case"
    )
    print(table(rows))
    write_result(
        "bench_resize",
        {
            "pil_versions": versions,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
