"""lorapipe side by side with diffusers' one-file LoRA script (issue #17): fresh run, a changed
``learning_rate``, nothing changed, and steady training images/s, on the same model and images.

The peer is ``examples/text_to_image/train_text_to_image_lora.py`` of diffusers (not part of
this project and never committed: pass its path with ``--script``; it is copied to
``bench/out/vs_script/`` and run from there, and its sha256 goes into the JSON). Get it from a
diffusers checkout of the release that matches the installed diffusers, e.g.
``git -C diffusers show v0.40.0:examples/text_to_image/train_text_to_image_lora.py > t2i.py``.

Both sides get the same local diffusers folder (no hub at run time), the same images and
captions, resolution, batch, rank (alpha = rank, as the script fixes it), learning rate,
constant schedule, steps, seed, CPU fp32 and ``--cores`` torch threads:

- ``tiny``: lorapipe's tiny SD-1.x model (``lorapipe.tiny.build_tiny_model``, seed 0, what the
  demo's ``tiny_model`` rule builds), the demo's 40 images (``lorapipe.demo``, seed 0) and
  captions (a sidecar for every third image, else the template ``a picture in lorapipe
  style``), 64 px, batch 4, rank 4, lr 1e-3 (then 5e-4), 60 steps (the demo's 6 epochs);
- ``sd15``: an SD-1.5-shaped model with random weights (SD-1.5's UNet, VAE and CLIP-L text
  encoder configs; lorapipe.tiny's offline tokenizer), saved once as a diffusers folder in
  ``bench/out/vs_script/models/`` (4.3 GB), the same 40 images at 128 px, batch 1, 8 steps;
- ``sd15-512``: that model at 512 px, batch 1, 6 steps, the first 8 demo images, steady
  images/s only (the script VAE-encodes every batch, lorapipe trains from cached latents);
- ``sd15-epoch``: ``sd15`` with 40 steps, one epoch, so that each tool encodes every image once
  (lorapipe ahead of training, the script in its steps); fresh and lr only. Not in the default
  ``--models``: run it by name.

Scenarios (per round, each tool in a fresh work folder under ``bench/out/vs_script/``; the
tools alternate ABAB, the order reversed every other round; before a model's rounds its files
are read and the libraries both tools import are imported once in a throwaway process, so that
the first run of a session does not pay the page cache for both: ``--cold-cache`` skips that):

1. ``fresh``: lorapipe: ``snakemake --cores N --configfile bench.yaml`` in a fresh copy of the
   workflow (``--tree``, default HEAD, ``git archive``d as bench_fixed_cost.py does; its own
   MLflow store and sha256 cache, so the base model is hashed as on first use); the dataset is a
   plain folder made before the clock starts (no ``synthetic`` block), the model a given folder
   (no ``tiny`` block). Script: one run (new output folder, new ``HF_HOME``, so the datasets
   cache is cold);
2. ``lr``: ``learning_rate`` changed: lorapipe with a second config file (reruns what is stale);
   the script runs again with ``--learning_rate`` (it redoes everything; datasets cache warm);
3. ``noop``: the same command again: lorapipe has nothing to do, the script trains again;
   ``fresh2`` (lorapipe only, against the script's ``fresh``): a second new project on the same
   machine: a new work folder, no warm worker, the model hashed anew, and of lorapipe's cache
   only what is not about the model (the MLflow store template, the parsed-module cache);
4. ``steady``: training images/s after the first step: lorapipe's ``images_per_s_steady``
   (``train_summary.json``); for the script the same definition (images after the first
   step over the time from the end of the first step to the end of the last): the script is
   run unmodified through ``runpy`` by this file (``--run-script``), which subclasses
   ``tqdm.auto.tqdm`` to timestamp each ``update()`` of the "Steps" bar (the script calls it
   once per optimizer step, after ``optimizer.step()``). Median over the runs that trained
   (fresh and lr of every round).

Settings the two cannot match: lorapipe's square mode is ``buckets: false`` (resize the short
side, center crop), matched by the script's ``--center_crop``; ``min_size: 0`` (the demo images
are 72-128 px, below half of 512). lorapipe saves one checkpoint (``save_steps`` = steps), exports
two LoRA layouts and logs to MLflow (live and a ``track`` job); the script saves one LoRA and
logs nothing (its default ``--report_to tensorboard`` is skipped by accelerate when tensorboard
is not installed). No sample grids (``sample_grids: false``) and no ``--validation_prompt``; no
validation split. The script is run with plain ``python`` (``--mixed_precision no``,
``CUDA_VISIBLE_DEVICES=''``, ``ACCELERATE_USE_CPU=1``), as ``accelerate launch --cpu`` would.

The script needs ``datasets`` and ``torchvision``, which lorapipe does not. When the venv lacks
them they are installed once with ``pip install --target bench/out/script-deps --no-deps``
(``datasets`` and the three packages it adds to this venv: dill, multiprocess, xxhash; the
``torchvision`` release of the installed torch) and put on the script's PYTHONPATH only, so the
project's venv is not touched. PyPI's Linux torchvision is a CUDA build whose C++ ops cannot load
against a CPU torch (``operator torchvision::nms does not exist`` at import): then the runner
skips ``torchvision._meta_registrations`` (fake kernels of nms/roi_align, which the script does
not use); the transforms the script uses are pure Python.

    python bench/bench_vs_script.py --script /path/to/train_text_to_image_lora.py
    python bench/bench_vs_script.py --script t2i.py --models tiny --rounds 1
    python bench/bench_vs_script.py --script t2i.py --models sd15,sd15-512 --rounds 2 --cores 2
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, median, out_dir, stop_warm_workers, write_result  # noqa: E402
from bench_datawait import sd15_model as sd15_folder  # noqa: E402
from bench_datawait import tiny_model  # noqa: E402
from bench_fixed_cost import fresh_copy, materialise, run  # noqa: E402
from bench_overhead import job_phases  # noqa: E402

sys.path.insert(0, str(REPO / "src"))

# fresh2: lorapipe only, against the script's fresh run: a second new project on the same
# machine (a new work folder, no warm worker, the model hashed anew, lorapipe's other caches --
# the MLflow store template, the parsed-module cache -- kept from the first)
SCENARIOS = ("fresh", "lr", "noop", "fresh2")
KEPT_CACHES = ("mlflow-store", "script-imports")
LR2 = 5.0e-4  # the changed learning rate (bench_fixed_cost's)
MODELS = {
    # resolution px, batch, steps, images, scenarios
    "tiny": {"resolution": 64, "batch": 4, "steps": 60, "images": 40, "scenarios": SCENARIOS},
    "sd15": {"resolution": 128, "batch": 1, "steps": 8, "images": 40, "scenarios": SCENARIOS},
    "sd15-512": {"resolution": 512, "batch": 1, "steps": 6, "images": 8, "scenarios": ("fresh",)},
    "sd15-epoch": {"resolution": 128, "batch": 1, "steps": 40, "images": 40,
                   "scenarios": ("fresh", "lr")},  # fmt: skip
}
COMMON = {"rank": 4, "lr": 1.0e-3, "seed": 0}
TEMPLATE, TRIGGER = "a picture in {trigger} style", "lorapipe"
SCRIPT_NAME = "train_text_to_image_lora.py"
DEPS_DIR = REPO / "bench" / "out" / "script-deps"
# --no-deps: what `pip install --dry-run datasets` adds to this venv, nothing it already has
DATASETS_PKGS = ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0")
SD15_VERSION = 1  # bump when the SD-1.5-shaped folder's contents change


# ---------------------------------------------------------------- the script's runner
def run_script_main(argv: list[str]) -> None:
    """``--run-script OUT.json SCRIPT ARGS...``: run SCRIPT as ``__main__`` with ARGS, timing
    each step (the "Steps" progress bar's updates) into OUT.json."""
    t_start = time.time()
    out_json, script, args = argv[0], argv[1], argv[2:]
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and torch.version.cuda is None:
        version_py = Path(spec.origin).with_name("version.py").read_text()
        if "+cu" in version_py.split("\n", 1)[0]:  # a CUDA build on a CPU torch: no C++ ops
            import types

            stub = types.ModuleType("torchvision._meta_registrations")
            sys.modules["torchvision._meta_registrations"] = stub
    import runpy

    import tqdm.auto

    ends: list[float] = []

    class StepTimes(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            self._bench_steps = k.get("desc") == "Steps"
            super().__init__(*a, **k)

        def update(self, n=1):
            if self._bench_steps:
                ends.append(time.time())
            return super().update(n)

    tqdm.auto.tqdm = StepTimes
    sys.argv = [script, *args]
    rc = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        Path(out_json).write_text(
            json.dumps({"start": t_start, "step_ends": ends, "end": time.time(), "rc": rc})
        )
    sys.exit(rc)


# ---------------------------------------------------------------- inputs
def script_copy(path: str) -> tuple[Path, str]:
    """The script copied into bench/out/vs_script/ (never into the tree) and its sha256."""
    src = Path(path)
    if not src.is_file():
        raise SystemExit(f"--script {path}: no such file (see --help: where to get it)")
    dest = out_dir() / "vs_script" / SCRIPT_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dest.resolve():
        shutil.copyfile(src, dest)
    return dest, hashlib.sha256(dest.read_bytes()).hexdigest()


# What both tools import: read once before a model's rounds, so that neither tool's first run
# pays for library files not yet in the page cache (the first run of a session imported 40 %
# slower: 12.5 against 8.8 s for the warm worker's first stage, #17).
CACHE_IMPORTS = ("torch", "numpy", "PIL.Image", "safetensors.torch", "diffusers", "transformers",
                 "peft", "accelerate", "mlflow", "matplotlib.pyplot", "snakemake.cli", "datasets")


def warm_page_cache(model: Path, deps: str | None) -> float:
    """Read every file of ``model`` and import `CACHE_IMPORTS` in a throwaway process; seconds."""
    t = time.perf_counter()
    for f in sorted(p for p in Path(model).rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    code = (f"import importlib\nfor m in {CACHE_IMPORTS!r}:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception:\n        pass\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if deps:
        env["PYTHONPATH"] = deps
    subprocess.run([sys.executable, "-c", code], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t


def script_deps() -> str | None:
    """The extra PYTHONPATH entry the script needs (datasets, torchvision), installed once."""
    need = [m for m in ("datasets", "torchvision") if importlib.util.find_spec(m) is None]
    if not need:
        return None
    have = all((DEPS_DIR / m).is_dir() for m in need)
    if not have:
        import torch

        minor = int(torch.__version__.split(".")[1])
        pkgs = [*DATASETS_PKGS] if "datasets" in need else []
        if "torchvision" in need:
            pkgs.append(f"torchvision==0.{minor + 15}.*")  # torch 2.13 <-> torchvision 0.28
        print(f"installing the script's packages into {DEPS_DIR}: {' '.join(pkgs)}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-deps", "--target", str(DEPS_DIR), *pkgs],
            check=True,
        )  # fmt: skip
    return str(DEPS_DIR)


def sd15_model(models: Path) -> Path:
    """An SD-1.5-shaped diffusers folder with random weights (UNet, VAE, CLIP-L text encoder
    from SD-1.5's configs; tokenizer, scheduler and model_index.json from the tiny model):
    bench_datawait's, with the UNet's weights saved."""
    path = models / "sd15"
    stamp = path / ".complete"
    if not stamp.exists() or stamp.read_text() != str(SD15_VERSION):
        print(f"building the SD-1.5-shaped model in {path} (once; ~4.3 GB)", flush=True)
    return sd15_folder(models, tiny_model(models), name="sd15", unet_weights=True,
                 version=SD15_VERSION)  # fmt: skip


def demo_images(folder: Path, images: int) -> None:
    """The demo's images (lorapipe.demo, seed 0 as config/config.yaml) in ``folder``."""
    from lorapipe.demo import make_demo_dataset

    make_demo_dataset(folder, images=images, seed=0)


def script_dataset(lorapipe_folder: Path, dest: Path) -> int:
    """An imagefolder (PNGs + metadata.jsonl) with lorapipe's captions of the same images: the
    sidecar's text, else the template caption; the truncated JPEG (which lorapipe rejects) left
    out. Returns the number of images."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for png in sorted(lorapipe_folder.glob("*.png")):
        side = png.with_suffix(".txt")
        text = side.read_text(encoding="utf-8").strip() if side.exists() else None
        rows.append({"file_name": png.name, "text": text or TEMPLATE.format(trigger=TRIGGER)})
        shutil.copyfile(png, dest / png.name)
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def lorapipe_yaml(model: Path, m: dict, lr: float) -> str:
    return f"""\
datasets:
  mine:
    path: data/mine
    resolution: {m["resolution"]}
    buckets: false
    min_size: 0
    captioner: template
    caption_template: "{TEMPLATE}"
    trigger: {TRIGGER}
base_models:
  given:
    path: {model}
sample_grids: false
runs:
  bench:
    dataset: mine
    base_model: given
    lora_rank: {COMMON["rank"]}
    lora_alpha: {COMMON["rank"]}
    learning_rate: {lr}
    lr_scheduler: constant
    warmup_steps: 0
    batch_size: {m["batch"]}
    max_steps: {m["steps"]}
    save_steps: {m["steps"]}
    seed: {COMMON["seed"]}
"""


# ---------------------------------------------------------------- one round of each tool
def steady(images_per_step: int, ends: list[float]) -> float | None:
    """lorapipe's definition (training.report.steady_rate) for equal batches."""
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return images_per_step * (len(ends) - 1) / (ends[-1] - ends[0])


def stage_work(work: Path, since: float) -> dict[str, float]:
    """Seconds of each stage's own work in the run that began at ``since``: the ``work`` phase
    of its jobs' ``<log>.times.json`` (`lorapipe.jobtime`: no interpreter, imports, model
    construction, Snakemake; read by bench_overhead's `job_phases`), summed per rule."""
    out: dict[str, float] = {}
    for rec in job_phases(work, since):
        out[rec["rule"]] = out.get(rec["rule"], 0.0) + float(rec.get("work") or 0.0)
    return out


def lorapipe_round(name: str, m: dict, src: Path, model: Path, work: Path, cores: int) -> dict:
    work = fresh_copy(src, work)
    demo_images(work / "data" / "mine", m["images"])
    (work / "bench.yaml").write_text(lorapipe_yaml(model, m, COMMON["lr"]))
    (work / "lr.yaml").write_text(f"runs:\n  bench:\n    learning_rate: {LR2}\n")
    configs = {
        "fresh": ["--configfile", "bench.yaml"],
        "lr": ["--configfile", "bench.yaml", "lr.yaml"],
        "noop": ["--configfile", "bench.yaml", "lr.yaml"],
        "fresh2": ["--configfile", "bench.yaml"],
    }
    summary = work / "results" / "runs" / "bench" / "train_summary.json"
    out: dict = {"tool": "lorapipe", "model": name}
    first = work
    for sc in m["scenarios"]:
        if sc == "fresh2":
            work = fresh_copy(src, first.with_name(first.name + "-2"))
            demo_images(work / "data" / "mine", m["images"])
            (work / "bench.yaml").write_text(lorapipe_yaml(model, m, COMMON["lr"]))
            for kept in KEPT_CACHES:
                if (first / ".lorapipe-cache" / kept).is_dir():
                    shutil.copytree(first / ".lorapipe-cache" / kept,
                                    work / ".lorapipe-cache" / kept)  # fmt: skip
            summary = work / "results" / "runs" / "bench" / "train_summary.json"
        if sc in ("fresh", "fresh2"):
            stop_warm_workers()  # a first run starts its warm worker (#17); lr, noop find it
        t0 = time.time()
        r = run(work, configs[sc], cores)
        r["work_s"] = stage_work(work, t0)
        if sc != "noop" and summary.exists():
            s = json.loads(summary.read_text())
            r["steady"] = s.get("images_per_s_steady")
            r["train_summary"] = {k: s.get(k) for k in ("steps", "wall_s", "final_loss")}
        out[sc] = r
        print(f"    lorapipe {sc}: {r['wall_s']:.1f} s, {r['jobs']} jobs"
              + (f", {r['steady']:.3g} img/s" if r.get("steady") else ""), flush=True)  # fmt: skip
    return out


def script_run(script: Path, model: Path, data: Path, work: Path, m: dict, lr: float,
               cores: int, deps: str | None, tag: str) -> dict:  # fmt: skip
    times = work / f"times-{tag}.json"
    args = [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--caption_column", "text", "--resolution", str(m["resolution"]), "--center_crop",
        "--train_batch_size", str(m["batch"]), "--max_train_steps", str(m["steps"]),
        "--learning_rate", str(lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--rank", str(COMMON["rank"]), "--seed", str(COMMON["seed"]),
        "--output_dir", str(work / "output"), "--mixed_precision", "no",
        "--dataloader_num_workers", "0", "--checkpointing_steps", "1000000",
    ]  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-script", str(times),
           str(script), *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(
        HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1",
        BENCH_THREADS=str(cores), TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    if deps:
        env["PYTHONPATH"] = deps
    load0 = load_average()
    t0 = time.time()
    with open(work / f"log-{tag}.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (work / f"log-{tag}.txt").read_text(errors="replace")[-6000:]
        raise RuntimeError(f"the script failed ({proc.returncode}) in {work}:\n{tail}")
    t = json.loads(times.read_text())
    ends = t["step_ends"]
    if len(ends) != m["steps"]:
        raise RuntimeError(f"{work}: {len(ends)} steps timed, expected {m['steps']}")
    return {
        "wall_s": wall,
        "steady": steady(m["batch"], ends),
        "to_first_step_s": ends[0] - t0,
        "steps_s": ends[-1] - ends[0],
        "after_last_step_s": t0 + wall - ends[-1],
        "load": [load0, load_average()],
    }


def script_round(name: str, m: dict, script: Path, model: Path, work: Path, cores: int,
                 deps: str | None) -> dict:  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    demo_images(work / "demo", m["images"])
    data = work / "data"
    n = script_dataset(work / "demo", data)
    out: dict = {"tool": "script", "model": name, "images": n}
    for sc in m["scenarios"]:
        if sc == "fresh2":
            continue  # the script keeps nothing between projects: compared with its fresh run
        if sc == "fresh":
            shutil.rmtree(work / "hf", ignore_errors=True)
            shutil.rmtree(work / "output", ignore_errors=True)
        lr = COMMON["lr"] if sc == "fresh" else LR2
        r = script_run(script, model, data, work, m, lr, cores, deps, sc)
        out[sc] = r
        print(f"    script   {sc}: {r['wall_s']:.1f} s (first step after "
              f"{r['to_first_step_s']:.1f} s), {r['steady']:.3g} img/s", flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------- summary
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def med(xs: list[float]) -> float | None:
    return median(xs) if xs else None


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        mine = [r for r in results if r["model"] == name]
        lp = [r for r in mine if r["tool"] == "lorapipe"]
        sc_ = [r for r in mine if r["tool"] == "script"]
        for sc in MODELS[name]["scenarios"] if name != "sd15-512" else ():
            b_sc = "fresh" if sc == "fresh2" else sc
            a = med([r[sc]["wall_s"] for r in lp if sc in r])
            b = med([r[b_sc]["wall_s"] for r in sc_ if b_sc in r])
            rows.append({
                "model": name, "scenario": f"{sc} (wall s)", "lorapipe": a, "script": b,
                "lorapipe/script": ratio(a, b), "lorapipe jobs": lp[0][sc]["jobs"] if lp else None,
                "n": max(len(lp), len(sc_)),
            })  # fmt: skip
        trained = [s for s in ("fresh", "lr") if s in MODELS[name]["scenarios"]]
        a_s = [r[s]["steady"] for r in lp for s in trained if r[s].get("steady")]
        b_s = [r[s]["steady"] for r in sc_ for s in trained if r[s].get("steady")]
        a, b = med(a_s), med(b_s)
        rows.append({
            "model": name, "scenario": "steady (img/s)", "lorapipe": a, "script": b,
            "lorapipe/script": ratio(a, b), "lorapipe jobs": None,
            "n": max(len(a_s), len(b_s)),
        })  # fmt: skip
    return rows


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def floor(results: list[dict]) -> list[dict]:
    """What no cut of the fixed cost can go below (medians): the work of the stages on a run's
    critical path, encode then train (their ``work`` phases, `stage_work`), against the script's
    whole run. ``floor/script`` is the ratio lorapipe would reach if Snakemake, interpreters,
    imports, model construction, tracking and hand-overs all cost nothing."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        lp = [r for r in results if r["model"] == name and r["tool"] == "lorapipe"]
        sc_ = [r for r in results if r["model"] == name and r["tool"] == "script"]
        for sc in ("fresh", "lr"):
            runs = [r[sc] for r in lp if "work_s" in r.get(sc, {})]
            if not runs:
                continue
            enc = med([r["work_s"].get("encode", 0.0) for r in runs])
            tr = med([r["work_s"].get("train", 0.0) for r in runs])
            b = med([r[sc]["wall_s"] for r in sc_ if sc in r])
            rows.append({"model": name, "scenario": sc, "encode work s": enc,
                         "train work s": tr, "floor s": enc + tr, "script s": b,
                         "floor/script": ratio(enc + tr, b)})  # fmt: skip
    return rows


def breakdown(results: list[dict]) -> list[dict]:
    """Where the fresh run's time went (medians): lorapipe's job seconds per rule (``job``:
    Snakemake's records, from marked started to the last output; ``process``: the job's own
    process, from its ``benchmark:`` file), the script's start-up to the end of its first step,
    its other steps, and what follows the last."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        lp = [r["fresh"] for r in results if r["model"] == name and r["tool"] == "lorapipe"]
        sc = [r["fresh"] for r in results if r["model"] == name and r["tool"] == "script"]
        for rule in sorted({k for r in lp for k in r["times"]}):
            per = [sum(r["times"].get(rule, [])) for r in lp]
            rows.append({"model": name, "tool": "lorapipe", "part": f"job {rule}",
                         "s (median)": median(per)})  # fmt: skip
        for stage in sorted({k for r in lp for k in r.get("benchmark_s", {})}):
            per = [sum(r["benchmark_s"].get(stage, [])) for r in lp]
            rows.append({"model": name, "tool": "lorapipe", "part": f"process {stage}",
                         "s (median)": median(per)})  # fmt: skip
        for part in ("to_first_step_s", "steps_s", "after_last_step_s") if sc else ():
            rows.append({"model": name, "tool": "script", "part": part.removesuffix("_s"),
                         "s (median)": median([r[part] for r in sc])})  # fmt: skip
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-script":
        run_script_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )  # fmt: skip
    ap.add_argument("--script", required=True, help=f"path of diffusers' {SCRIPT_NAME}")
    ap.add_argument("--models", default="tiny,sd15,sd15-512", help="comma-separated: " +
                    ", ".join(MODELS))  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=2, help="snakemake --cores; the script's threads")
    ap.add_argument("--tree", default="HEAD", help="lorapipe: a git revision or a folder")
    ap.add_argument("--tools", default="lorapipe,script", help="run only these (to debug one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    ap.add_argument("--cold-cache", action="store_true",
                    help="do not read the model and import the libraries once before the rounds")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    script, script_sha = script_copy(args.script)
    deps = script_deps()
    root = out_dir() / "vs_script"
    models_dir = root / "models"
    src = materialise("lorapipe", args.tree, root)
    import diffusers

    results = []
    for name in names:
        m = MODELS[name]
        model = tiny_model(models_dir) if name == "tiny" else sd15_model(models_dir)
        if not args.cold_cache:
            print(f"{name}: page cache warmed in {warm_page_cache(model, deps):.1f} s", flush=True)
        for k in range(args.rounds):
            order = ("lorapipe", "script") if k % 2 == 0 else ("script", "lorapipe")
            for tool in (t for t in order if t in args.tools.split(",")):
                work = root / f"{name}-r{k}-{tool}"
                print(f"{name} round {k + 1}/{args.rounds}: {tool}", flush=True)
                if tool == "lorapipe":
                    r = lorapipe_round(name, m, src, model, work, args.cores)
                else:
                    r = script_round(name, m, script, model, work, args.cores, deps)
                r["round"] = k
                results.append(r)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
    rows = summarise(results)
    parts = breakdown(results)
    floors = floor(results)
    print("\nwall s: lorapipe/script < 1 = lorapipe faster; img/s: > 1 = lorapipe faster; "
          "n: samples per median (rounds; for img/s the fresh and lr runs)\n")  # fmt: skip
    print(md_table(rows))
    print()
    print(md_table(parts))
    print("\nfloor: lorapipe's encode + train work alone (no fixed cost at all) against the "
          "script's whole run\n")  # fmt: skip
    print(md_table(floors))
    write_result("vs_script", {
        "script": {"path": args.script, "sha256": script_sha},
        "diffusers": diffusers.__version__, "tree": args.tree, "cores": args.cores,
        "models": {n: {**MODELS[n], **COMMON, "lr2": LR2} for n in names},
        "summary": rows, "breakdown": parts, "floor": floors, "rounds": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
