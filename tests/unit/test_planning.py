"""Planning (lorapipe.planning): listings, shards, param stamps, sidecars, caption edits, model
file lists and run paths, on folders made here; files the plan cannot read never stop it."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
from snakemake.exceptions import WorkflowError

from lorapipe import planning
from lorapipe.config import load_config
from lorapipe.demo import demo_files
from lorapipe.families import SD
from lorapipe.manifest import shard_of
from lorapipe.planning import Planner, file_stamp, shard_index

SHARDS = 3


def make_config(tmp_path: Path, datasets: dict | None = None, **extra) -> dict:
    """A loaded config (defaults filled) with a folder dataset ``mine`` at ``tmp_path/mine``."""
    cfg = {
        "datasets": datasets or {"mine": {"path": str(tmp_path / "mine"), "shards": SHARDS}},
        "base_models": {"tiny-sd": {"path": "results/models/tiny-sd", "tiny": {"seed": 0}}},
        "runs": {"r1": {"dataset": next(iter(datasets or {"mine": 0})), "base_model": "tiny-sd"}},
    }
    for key, value in extra.items():
        cfg[key].update(value)
    return load_config(copy.deepcopy(cfg), workdir=tmp_path, check_files=False)


def write(path: Path, data: bytes = b"x") -> Path:
    """Write ``data`` to ``path``, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def images_in_every_shard(root: Path, per_shard: int = 2) -> dict[int, list[str]]:
    """Write image files until each shard has ``per_shard`` of them; returns them by shard."""
    by_shard: dict[int, list[str]] = {i: [] for i in range(SHARDS)}
    i = 0
    while min(len(v) for v in by_shard.values()) < per_shard:
        rel = f"img_{i:03d}.png"
        if len(by_shard[shard_of(rel, SHARDS)]) < per_shard:
            write(root / rel, bytes(i))
            by_shard[shard_of(rel, SHARDS)].append(rel)
        i += 1
    return by_shard


def stamps(plan: Planner, kind: str = "shard_stamp") -> list[str]:
    """The stamp of each shard of ``mine`` (``shard_stamp`` or ``sidecar_stamp``)."""
    return [getattr(plan, kind)("mine", s) for s in plan.shard_ids("mine")]


def test_folder_listing_and_shards(tmp_path):
    """Every image (any case, in subfolders) in exactly the shard manifest.shard_of names;
    hidden and non-image files are left out."""
    root = tmp_path / "mine"
    names = ["a.png", "sub/b.JPG", "sub/deeper/c.webp", "d.jpeg"]
    for n in names + [".hidden.png", ".dir/e.png", "notes.md", "a.txt"]:
        write(root / n)
    plan = Planner(make_config(tmp_path))
    assert plan.images("mine") == sorted(names)
    assert plan.shard_ids("mine") == ["00000", "00001", "00002"]
    for s in plan.shard_ids("mine"):
        assert plan.shard_relpaths("mine", s) == [
            n for n in sorted(names) if shard_of(n, 3) == int(s)
        ]
    # a folder's images are params (stamped), not declared inputs
    assert plan.shard_inputs("mine", "00000") == [] and plan.sidecar_inputs("mine", "00000") == []


def test_listing_is_read_once_per_plan(tmp_path, monkeypatch):
    """All shards, stamps, sidecars and edits of a dataset come from one listing."""
    images_in_every_shard(tmp_path / "mine")
    calls = []
    real = planning.list_images
    monkeypatch.setattr(planning, "list_images", lambda root: calls.append(root) or real(root))
    plan = Planner(make_config(tmp_path))
    for s in plan.shard_ids("mine"):
        plan.shard_stamp("mine", s)
        plan.sidecar_stamp("mine", s)
        plan.shard_overrides("mine", s)
    assert len(calls) == 1


def test_stamp_changes_with_size_or_mtime_only_for_its_shard(tmp_path):
    """A file grown, touched, added or removed restales exactly its own shard."""
    root = tmp_path / "mine"
    by_shard = images_in_every_shard(root)
    cfg = make_config(tmp_path)
    before = stamps(Planner(cfg))
    assert stamps(Planner(cfg)) == before  # stable from plan to plan
    assert all(st.startswith("2:") and len(st) == 34 for st in before)

    victim = root / by_shard[1][0]
    victim.write_bytes(victim.read_bytes() + b"more")  # size
    grown = stamps(Planner(cfg))
    assert grown[0] == before[0] and grown[2] == before[2] and grown[1] != before[1]

    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # mtime only
    touched = stamps(Planner(cfg))
    assert touched[0] == before[0] and touched[2] == before[2] and touched[1] != grown[1]

    (root / by_shard[2][1]).unlink()  # removed
    removed = stamps(Planner(cfg))
    assert removed[:2] == touched[:2] and removed[2] != touched[2] and removed[2].startswith("1:")


def test_stamp_is_the_recorded_digest(tmp_path):
    """The stamp of readable, UTF-8 named files is the digest results folders already hold
    (path, size, mtime_ns), so moving the code into this module restales nothing."""
    root = tmp_path / "mine"
    rels = ["a.png", "sub/ünï.png"]
    for rel in rels:
        write(root / rel, rel.encode())
    h = hashlib.sha256()
    for rel in rels:
        st = os.stat(root / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    assert file_stamp(root, rels) == f"2:{h.hexdigest()[:32]}"
    assert file_stamp(root, []) == f"0:{hashlib.sha256().hexdigest()[:32]}"


def test_sidecars_txt_and_caption(tmp_path):
    """Sidecars with either extension are found (.txt wins over .caption); editing one restales
    only its shard's captions."""
    root = tmp_path / "mine"
    by_shard = images_in_every_shard(root)
    txt, cap, both = by_shard[0][0], by_shard[1][0], by_shard[2][0]
    write(root / txt.replace(".png", ".txt"))
    write(root / cap.replace(".png", ".caption"))
    write(root / both.replace(".png", ".txt"))
    write(root / both.replace(".png", ".caption"))
    cfg = make_config(tmp_path)
    plan = Planner(cfg)
    assert plan.shard_sidecars("mine", "00000") == [txt.replace(".png", ".txt")]
    assert plan.shard_sidecars("mine", "00001") == [cap.replace(".png", ".caption")]
    assert plan.shard_sidecars("mine", "00002") == [both.replace(".png", ".txt")]
    before = stamps(plan, "sidecar_stamp")
    write(root / cap.replace(".png", ".caption"), b"an edited caption")
    after = stamps(Planner(cfg), "sidecar_stamp")
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]


def test_caption_overrides_per_shard(tmp_path):
    """captions.csv rows go to the shard of their image only (sorted); rows naming no image
    go nowhere; no captions.csv means no edits."""
    root = tmp_path / "mine"
    by_shard = images_in_every_shard(root)
    assert all(Planner(make_config(tmp_path)).shard_overrides("mine", s) == {} for s in "012")
    a, b, c = by_shard[0][1], by_shard[0][0], by_shard[2][0]
    rows = [f"{a},edit a", f"./{b},edit b", f"{c},edit c", "gone.png,nobody"]
    (root / "captions.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    plan = Planner(make_config(tmp_path))
    first = plan.shard_overrides("mine", "00000")
    assert first == {a: "edit a", b: "edit b"} and list(first) == sorted(first)
    assert plan.shard_overrides("mine", "00001") == {}
    assert plan.shard_overrides("mine", "00002") == {c: "edit c"}


def test_synthetic_dataset(tmp_path):
    """A generated dataset is known before its folder exists: images and sidecars are declared
    inputs and the stamps say "generated"; a sidecar a person adds later is found too."""
    root = tmp_path / "demo"
    ds = {"demo": {"path": str(root), "synthetic": {"images": 10, "seed": 0}, "shards": 2}}
    plan = Planner(make_config(tmp_path, datasets=ds))
    files = demo_files(10)
    images = sorted(f for f in files if not f.endswith(".txt"))
    assert plan.images("demo") == images and not root.exists()
    declared, sidecars = [], []
    for s in plan.shard_ids("demo"):
        rels = plan.shard_relpaths("demo", s)
        assert plan.shard_inputs("demo", s) == [str(root / r) for r in rels]
        assert plan.shard_stamp("demo", s) == plan.sidecar_stamp("demo", s) == "generated"
        declared += rels
        sidecars += plan.sidecar_inputs("demo", s)
    assert sorted(declared) == images
    assert sorted(sidecars) == sorted(str(root / f) for f in files if f.endswith(".txt"))

    write(root / "img_001.caption")  # not one the rule writes
    shard = f"{shard_of('img_001.png', 2):05d}"
    assert str(root / "img_001.caption") in Planner(plan.config).sidecar_inputs("demo", shard)


def diffusers_folder(path: Path, index: bool = True) -> Path:
    """A stand-in diffusers folder: a config per part, one weights file, a nested file."""
    for part in SD.parts:
        write(path / part / "config.json", b'{"cross_attention_dim": 768}')
    write(path / "unet" / "diffusion_pytorch_model.safetensors")
    write(path / "tokenizer" / "sub" / "merges.txt")
    if index:
        write(path / "model_index.json", b'{"_class_name": "StableDiffusionPipeline"}')
    return path


def test_model_files_of_a_diffusers_folder(tmp_path):
    """Every file of the asked parts (nested ones too), plus model_index.json when present."""
    sd = diffusers_folder(tmp_path / "sd")
    bare = diffusers_folder(tmp_path / "bare", index=False)
    plan = Planner(
        make_config(tmp_path, base_models={"sd": {"path": str(sd)}, "bare": {"path": str(bare)}})
    )
    assert not plan.model_built("sd")
    assert plan.model_files("sd", ["unet", "tokenizer"]) == [
        str(sd / f)
        for f in (
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "tokenizer/config.json",
            "tokenizer/sub/merges.txt",
        )
    ]
    assert plan.model_files("bare", ["vae"]) == [str(bare / "vae" / "config.json")]
    assert len(plan.model_files("sd")) == 8  # every part of the family (SD: five)
    assert plan.family("sd").name == plan.family("bare").name == "sd"


def test_model_files_of_a_single_file_checkpoint(tmp_path):
    """The .safetensors file, plus its original_config folder without any weights."""
    ckpt = write(tmp_path / "one.safetensors")
    conf = diffusers_folder(tmp_path / "one-config")
    write(conf / "vae" / "diffusion_pytorch_model.bin")
    write(conf / "text_encoder" / "model.ckpt")
    plan = Planner(
        make_config(
            tmp_path,
            base_models={"one": {"path": str(ckpt), "original_config": str(conf)}},
        )
    )
    files = plan.model_files("one", ["vae"])
    assert files[0] == str(ckpt)
    assert files[1:] == sorted(
        str(p) for p in conf.rglob("*") if p.is_file() and p.suffix in (".json", ".txt")
    )
    assert plan.original_config("one") == str(conf) and plan.original_config("tiny-sd") is None


def test_model_files_of_the_tiny_model(tmp_path):
    """A built model's files are known before it is built."""
    plan = Planner(make_config(tmp_path))
    assert plan.model_built("tiny-sd")
    root = Path("results/models/tiny-sd")
    assert plan.model_files("tiny-sd", ["vae", "scheduler"]) == [
        str(root / f)
        for f in (
            "model_index.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
        )
    ]


def test_dangling_link_does_not_stop_the_plan(tmp_path):
    """A link to nowhere is planned (the manifest stage rejects it) with a stable stamp that
    changes once its target appears."""
    root = tmp_path / "mine"
    write(root / "a.png")
    (root / "dangling.png").symlink_to(root / "target.png")
    cfg = make_config(tmp_path)
    plan = Planner(cfg)
    assert "dangling.png" in plan.images("mine")
    shard = f"{shard_of('dangling.png', SHARDS):05d}"
    first = plan.shard_stamp("mine", shard)
    assert Planner(cfg).shard_stamp("mine", shard) == first
    write(root / "target.png")
    assert Planner(cfg).shard_stamp("mine", shard) != first


def test_circular_links_do_not_stop_the_plan(tmp_path):
    """Links in a circle (and a link to itself) are planned with a stable stamp; their
    sidecar lookups (also circular) find nothing."""
    root = tmp_path / "mine"
    write(root / "a.png")
    (root / "loop1.png").symlink_to("loop2.png")
    (root / "loop2.png").symlink_to("loop1.png")
    (root / "self.jpg").symlink_to("self.jpg")
    (root / "self.txt").symlink_to("self.txt")
    cfg = make_config(tmp_path)
    plan = Planner(cfg)
    assert plan.images("mine") == ["a.png", "loop1.png", "loop2.png", "self.jpg"]
    before = stamps(plan)
    assert before == stamps(Planner(cfg))
    assert all(plan.shard_sidecars("mine", s) == [] for s in plan.shard_ids("mine"))
    shard = shard_of("loop1.png", SHARDS)
    (root / "loop1.png").unlink()
    write(root / "loop1.png")  # the link replaced by a real file: its shard restales
    assert stamps(Planner(cfg))[shard] != before[shard]


@pytest.fixture()
def latin1_root(tmp_path) -> Path:
    """The dataset folder with one image named in Latin-1 (``caf\\xe9.png``), where possible."""
    root = tmp_path / "mine"
    root.mkdir()
    try:
        (root / os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    return root


def test_non_utf8_name_gets_a_deterministic_shard(latin1_root):
    """A name that is not valid UTF-8 is listed, stamped and given the shard of the hash of its
    raw bytes (what shard_of does for every UTF-8 name); its sidecar is found."""
    name = os.fsdecode(b"caf\xe9.png")
    write(latin1_root / "a.png")
    (latin1_root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"a caption")
    plan = Planner(make_config(latin1_root.parent))
    assert name in plan.images("mine")
    expected = int.from_bytes(hashlib.sha1(b"caf\xe9.png").digest()[:8], "big") % SHARDS
    assert shard_index(name, SHARDS) == expected
    shard = f"{expected:05d}"
    assert name in plan.shard_relpaths("mine", shard)
    assert plan.shard_sidecars("mine", shard) == [os.fsdecode(b"caf\xe9.txt")]
    assert stamps(plan) == stamps(Planner(plan.config))
    assert stamps(plan, "sidecar_stamp")[expected].startswith("1:")


def test_shard_index_is_shard_of_for_utf8_names():
    """For every name shard_of can hash, the plan's shard is shard_of's."""
    for name in ("photos/cat 01.jpg", "sub/Ünïcode café.PNG", "img_000.png"):
        for n in (1, 7, 16):
            assert shard_index(name, n) == shard_of(name, n)


def test_empty_folder_fails_the_plan(tmp_path):
    """A folder with no images (hidden and other files only) is an error naming the dataset and
    the folder, raised while planning its shards."""
    root = tmp_path / "mine"
    write(root / "notes.md")
    write(root / ".hidden.png")
    plan = Planner(make_config(tmp_path))
    assert plan.shard_ids("mine") == ["00000", "00001", "00002"]  # no listing needed
    with pytest.raises(WorkflowError, match="datasets.mine.path: no images") as err:
        plan.shard_inputs("mine", "00000")
    assert str(root) in str(err.value)


def test_run_paths_and_resources(tmp_path):
    """Latent dtype (auto follows bf16), latent folder, per-run file lists and processes."""
    for n in ("a.png", "b.png"):
        write(tmp_path / "mine" / n)
    runs = {
        "bf": {"dataset": "mine", "base_model": "tiny-sd", "mixed_precision": "bf16"},
        "ddp": {"dataset": "mine", "base_model": "tiny-sd", "num_processes": 2},
        "auto": {"dataset": "mine", "base_model": "tiny-sd", "num_processes": "auto"},
    }
    plan = Planner(make_config(tmp_path, runs=runs))
    assert plan.latent_dtype("r1") == "float32" and plan.latent_dtype("bf") == "bfloat16"
    assert plan.latent_dir("bf") == "results/mine/latents/tiny-sd-512-bfloat16"
    assert plan.run_latent_sidecars("r1") == [
        f"results/mine/latents/tiny-sd-512-float32/0000{i}.tar.sha256" for i in range(3)
    ]
    assert plan.run_captions("ddp")[2] == "results/mine/captions/00002.jsonl"
    assert [plan.train_processes(r) for r in ("r1", "ddp", "auto")] == [1, 2, 1]
    assert [plan.train_gpus(r) for r in ("r1", "ddp", "auto")] == [0, 2, 0]
    ctx = plan.run_context("bf", {"torch": "x"})
    assert ctx["dataset"]["name"] == "mine"
    assert ctx["base_model"]["tiny"] == {"seed": 0, "family": "sd"}  # the schema default
    out = plan.final_outputs()
    # no run has validation prompts: LoRA, kohya file and MLflow run, no sample grid
    assert out.count("results/mine/manifest.jsonl") == 1 and len(out) == 4 * 3 + 2

    explicit = make_config(tmp_path)
    explicit["datasets"]["mine"]["latent_dtype"] = "bfloat16"
    assert Planner(explicit).latent_dtype("r1") == "bfloat16"


def test_sample_grids_track_inputs_and_encode_outputs(tmp_path):
    """A run gets sample grids when it has validation prompts and `sample_grids` is on; rule
    track then logs them, else it does not wait for them. One encode job writes every shard of a
    latent folder."""
    write(tmp_path / "mine" / "a.png")
    runs = {"p": {"dataset": "mine", "base_model": "tiny-sd", "validation_prompts": ["a"]}}
    cfg = make_config(tmp_path, runs=runs)
    plan = Planner(cfg)
    assert plan.sample_grids("p") and not plan.sample_grids("r1")
    out = plan.final_outputs()
    assert "results/runs/p/samples.png" in out and "results/runs/r1/samples.png" not in out
    base = {"config", "metrics", "lora", "kohya", "loss", "summary"}
    assert set(plan.track_inputs("p")) == base | {"samples", "step_samples"}
    assert plan.track_inputs("p")["step_samples"] == "results/runs/p/samples"
    assert set(plan.track_inputs("r1")) == base
    cfg["sample_grids"] = False
    off = Planner(cfg)
    assert not off.sample_grids("p") and set(off.track_inputs("p")) == base
    assert not any(f.endswith("samples.png") for f in off.final_outputs())

    assert plan.shard_tars("mine", ".sha256")[2] == "results/mine/shards/00002.tar.sha256"
    folder = "results/mine/latents/{model}-{res}-{dtype}"
    assert plan.latent_tars("mine") == [f"{folder}/0000{i}.tar" for i in range(SHARDS)]
    assert plan.encode_runtime("mine") == 60


def test_one_base_row_of_sample_images_per_model_prompts_steps_size_and_seed(tmp_path):
    """Rule sample_base's file: shared by runs that differ in anything else (a learning rate),
    its own for another prompt, seed, sampling steps, base model or resolution; its settings are
    found again from its name, and a name no run draws is an error."""
    write(tmp_path / "mine" / "a.png")
    one = {"dataset": "mine", "base_model": "tiny-sd", "validation_prompts": ["a", "b"]}
    runs = {
        "p": one,
        "lr": {**one, "learning_rate": 3e-4, "lora_rank": 2},
        "prompt": {**one, "validation_prompts": ["a", "c"]},
        "seed": {**one, "seed": 7},
        "steps": {**one, "validation_steps": 5},
        "xl": {**one, "base_model": "tiny-sdxl"},
        "res": {**one, "dataset": "big"},
    }
    mine = {"path": str(tmp_path / "mine"), "shards": SHARDS}
    datasets = {"mine": mine, "big": {**mine, "resolution": 256}}
    xl = {"tiny-sdxl": {"path": "results/models/tiny-sdxl", "tiny": {"seed": 0, "family": "sdxl"}}}
    plan = Planner(make_config(tmp_path, datasets, runs=runs, base_models=xl))
    rows = {r: plan.sample_base(r) for r in runs}
    assert rows["lr"] == rows["p"]
    assert len({rows[r] for r in runs if r != "lr"}) == len(runs) - 1
    assert rows["p"].startswith("results/samples/tiny-sd/base-")
    assert rows["xl"].startswith("results/samples/tiny-sdxl/base-")
    key = rows["seed"].rsplit("base-", 1)[1].removesuffix(".png")
    assert plan.sample_base_of("tiny-sd", key) == {
        "prompts": ["a", "b"], "steps": plan.runs["p"].validation_steps, "size": 512, "seed": 7}
    with pytest.raises(WorkflowError, match="no run of this config draws"):
        plan.sample_base_of("tiny-sdxl", key)


def test_auto_shard_count_follows_the_dataset_size():
    from lorapipe.planning import auto_shard_count

    got = [auto_shard_count(n) for n in (1, 40, 250, 251, 1000, 10_000, 64_000, 10**6)]
    assert got == [1, 1, 1, 2, 4, 40, 256, 256]


def test_shards_auto_is_chosen_once_and_kept_as_the_dataset_grows(tmp_path, monkeypatch):
    """`shards: auto` picks the count from the images at the first plan and records it in
    results/<dataset>/shards.json; later plans keep it (adding images restales one shard, not
    all), the run's config records the number, and deleting the file chooses again."""
    import json

    monkeypatch.chdir(tmp_path)
    for i in range(3):
        write(tmp_path / "mine" / f"a{i}.png")
    auto = {"mine": {"path": str(tmp_path / "mine"), "shards": "auto"}}
    cfg = make_config(tmp_path, datasets=auto)
    assert cfg["datasets"]["mine"]["shards"] == "auto"
    plan = Planner(cfg)
    assert plan.shard_ids("mine") == ["00000"]
    record = tmp_path / "results" / "mine" / "shards.json"
    assert json.loads(record.read_text())["shards"] == 1
    assert json.loads(record.read_text())["images_when_chosen"] == 3
    for i in range(300):  # now 303 images: auto would choose 2
        write(tmp_path / "mine" / f"b{i:03d}.png")
    again = Planner(make_config(tmp_path, datasets=auto))
    assert again.shard_ids("mine") == ["00000"]
    assert len(again.shard_relpaths("mine", "00000")) == 303
    assert again.run_context("r1", {})["dataset"]["shards"] == 1
    record.unlink()
    assert Planner(make_config(tmp_path, datasets=auto)).shard_ids("mine") == ["00000", "00001"]
    record.write_text("{not json")  # damaged: chosen again, rewritten
    assert Planner(make_config(tmp_path, datasets=auto)).shard_count("mine") == 2
    assert json.loads(record.read_text())["shards"] == 2


def test_shards_must_be_a_count_or_auto(tmp_path):
    from lorapipe.config import ConfigError

    for bad, msg in (("many", "does not match"), (0, "less than the minimum")):
        ds = {"mine": {"path": str(tmp_path / "mine"), "shards": bad}}
        with pytest.raises(ConfigError, match=rf"datasets\.mine\.shards: .*{msg}"):
            make_config(tmp_path, datasets=ds)
