"""Unit tests for lorapipe.captions: precedence of sources, the content-addressed cache, BLIP."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import lorapipe.captions as captions
from lorapipe.captions import CaptionSettings, caption_shard, read_overrides
from lorapipe.manifest import ScanSettings, list_images, read_jsonl, scan_shard

SCAN = ScanSettings(resolution=32, min_size=0.5, max_pixels=10**7, background="#ffffff")
TEMPLATE = CaptionSettings(captioner="template", template="a photo of {trigger}", trigger="sks")


def write_image(path: Path, colour=(10, 20, 30), size=(32, 32)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


class Dataset:
    """A dataset folder plus the scan → caption steps, as the workflow runs them."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "data"
        self.root.mkdir()
        self.work = tmp_path / "work"
        self.cache = tmp_path / "cache"
        self.runs = 0

    def caption(self, settings: CaptionSettings = TEMPLATE, overrides=None):
        """Scan and caption every image; returns (counts, records by path)."""
        self.runs += 1
        manifest = self.work / f"manifest{self.runs}.jsonl"
        scan_shard(self.root, list_images(self.root), SCAN, manifest)
        out = self.work / f"captions{self.runs}.jsonl"
        counts = caption_shard(self.root, manifest, settings, self.cache, out, overrides)
        return counts, {r["path"]: r for r in read_jsonl(out)}


@pytest.fixture()
def ds(tmp_path) -> Dataset:
    return Dataset(tmp_path)


def test_precedence_edit_sidecar_caption_cache_template(ds):
    """edit > sidecar .txt > kohya .caption > cache > template, each image from the best source."""
    for i, name in enumerate("abcdef"):
        write_image(ds.root / f"{name}.png", colour=(i * 40, 0, 0))
    ds.caption()  # fills the cache for all six
    (ds.root / "a.txt").write_text("sidecar a\n")
    (ds.root / "b.txt").write_text("sidecar b\n")
    (ds.root / "b.caption").write_text("kohya b\n")
    (ds.root / "c.caption").write_text("  kohya c \n")
    write_image(ds.root / "f.png", colour=(1, 2, 3))  # new bytes: not in the cache
    counts, recs = ds.caption(overrides={"a.png": "edited a"})
    got = {p: (r["source"], r["caption"]) for p, r in recs.items()}
    assert got == {
        "a.png": ("edit", "edited a"),
        "b.png": ("sidecar", "sidecar b"),
        "c.png": ("sidecar", "kohya c"),
        "d.png": ("cache", "a photo of sks"),
        "e.png": ("cache", "a photo of sks"),
        "f.png": ("template", "a photo of sks"),
    }
    assert counts == {"edit": 1, "sidecar": 2, "cache": 2, "template": 1}
    assert list(recs) == sorted(recs)
    assert all(set(r) == {"path", "sha256", "caption", "source"} for r in recs.values())


def test_template_fills_trigger_and_only_valid_images_are_captioned(ds):
    """The template's {trigger} is filled; rejected images get no caption line."""
    write_image(ds.root / "ok.png")
    (ds.root / "broken.png").write_bytes(b"")
    settings = CaptionSettings(captioner="template", template="{trigger} style, art", trigger="zxq")
    counts, recs = ds.caption(settings)
    assert recs == {
        "ok.png": {"path": "ok.png", "sha256": recs["ok.png"]["sha256"],
                   "caption": "zxq style, art", "source": "template"}
    }
    assert counts == {"template": 1}


def test_cache_is_keyed_by_image_bytes_and_captioner_settings(ds):
    """Renamed same bytes: hit; other template: miss; back to the first template: hit again."""
    sha_bytes = write_image(ds.root / "one.png")
    _, recs = ds.caption()
    assert recs["one.png"]["source"] == "template"
    sha = recs["one.png"]["sha256"]
    cached = ds.cache / TEMPLATE.captioner_id() / sha[:2] / f"{sha}.txt"
    assert cached.read_text() == "a photo of sks"

    (ds.root / "one.png").rename(ds.root / "renamed.png")
    assert (ds.root / "renamed.png").read_bytes() == sha_bytes
    _, recs = ds.caption()
    assert recs["renamed.png"]["source"] == "cache"

    other = CaptionSettings(captioner="template", template="a painting of {trigger}", trigger="sks")
    assert other.captioner_id() != TEMPLATE.captioner_id()
    _, recs = ds.caption(other)
    assert (recs["renamed.png"]["source"], recs["renamed.png"]["caption"]) == (
        "template", "a painting of sks")

    _, recs = ds.caption()
    assert (recs["renamed.png"]["source"], recs["renamed.png"]["caption"]) == (
        "cache", "a photo of sks")
    new_trigger = CaptionSettings(captioner="template", template=TEMPLATE.template, trigger="q")
    assert new_trigger.captioner_id() != TEMPLATE.captioner_id()


def test_cached_caption_is_what_the_captioner_wrote(ds):
    """A cache entry's text is used as is (the cache, not the template, is the source)."""
    write_image(ds.root / "x.png")
    _, recs = ds.caption()
    sha = recs["x.png"]["sha256"]
    (ds.cache / TEMPLATE.captioner_id() / sha[:2] / f"{sha}.txt").write_text("cached words")
    _, recs = ds.caption()
    assert (recs["x.png"]["source"], recs["x.png"]["caption"]) == ("cache", "cached words")


def test_prefix_applies_to_generated_captions_only(ds):
    """prefix goes before template and cache captions, never before edits or sidecars."""
    for name in ("gen", "cached", "side", "edit"):
        write_image(ds.root / f"{name}.png", colour=(len(name) * 30, 5, 5))
    ds.caption()
    (ds.root / "side.txt").write_text("my sidecar")
    write_image(ds.root / "gen.png", colour=(9, 9, 9))  # new bytes: generated again
    settings = CaptionSettings(captioner="template", template="a photo of {trigger}",
                               trigger="sks", prefix="sks, ")
    _, recs = ds.caption(settings, overrides={"edit.png": "my edit"})
    got = {p: (r["source"], r["caption"]) for p, r in recs.items()}
    assert got == {
        "gen.png": ("template", "sks, a photo of sks"),
        "cached.png": ("cache", "sks, a photo of sks"),
        "side.png": ("sidecar", "my sidecar"),
        "edit.png": ("edit", "my edit"),
    }
    sha = recs["gen.png"]["sha256"]
    assert (ds.cache / settings.captioner_id() / sha[:2] / f"{sha}.txt").read_text() == (
        "a photo of sks"
    )  # the cache holds the captioner's text, without the prefix


def test_captioner_none_needs_an_edit_or_sidecar(ds):
    """captioner 'none': fine when every image has an edit/sidecar; else names the image."""
    write_image(ds.root / "a.png")
    write_image(ds.root / "sub" / "b.png", colour=(1, 1, 1))
    (ds.root / "a.txt").write_text("a")
    none = CaptionSettings(captioner="none")
    counts, _ = ds.caption(none, overrides={"sub/b.png": "b"})
    assert counts == {"sidecar": 1, "edit": 1}
    with pytest.raises(FileNotFoundError, match=r"sub/b\.png.*no caption"):
        ds.caption(none)


def test_user_files_are_never_modified(ds):
    """Sidecars, kohya captions and captions.csv keep their bytes and mtime; no cache for them."""
    write_image(ds.root / "a.png")
    write_image(ds.root / "b.png", colour=(2, 2, 2))
    write_image(ds.root / "c.png", colour=(3, 3, 3))
    (ds.root / "a.txt").write_text("  spaced sidecar\n\n")
    (ds.root / "b.caption").write_text("kohya\n")
    (ds.root / "captions.csv").write_text("path,caption\nc.png, edited c \n")
    user = [ds.root / n for n in ("a.txt", "b.caption", "captions.csv")]
    for i, p in enumerate(user):
        os.utime(p, ns=(10**18 + i, 10**18 + i))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in user}
    overrides = read_overrides(ds.root / "captions.csv")
    counts, recs = ds.caption(CaptionSettings(captioner="none"), overrides=overrides)
    assert recs["c.png"]["caption"] == "edited c"
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in user} == before
    assert overrides == {"c.png": "edited c"}
    assert not ds.cache.exists()


def test_sidecar_with_bom_and_non_utf8_sidecar(ds):
    """A Windows BOM is not part of the caption; a non-UTF-8 sidecar is named in the error."""
    write_image(ds.root / "a.png")
    (ds.root / "a.txt").write_bytes("\ufeffcafé au lait\r\n".encode())
    _, recs = ds.caption()
    assert recs["a.png"]["caption"] == "café au lait"
    (ds.root / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8"):
        ds.caption()


def test_empty_captions_are_counted(ds):
    """An empty sidecar gives an empty caption, counted under 'empty'."""
    write_image(ds.root / "a.png")
    (ds.root / "a.txt").write_text("\n")
    counts, recs = ds.caption()
    assert recs["a.png"]["caption"] == ""
    assert counts["empty"] == 1


# --- captions.csv -----------------------------------------------------------------------------


def test_read_overrides_parses_quoted_fields_bom_and_dot_slash(tmp_path):
    """CSV quoting, an Excel BOM, './' prefixes and blank paths are all handled."""
    csv_path = tmp_path / "captions.csv"
    csv_path.write_bytes(
        '\ufeffpath,caption\n'
        './sub/a.png,"red, blue and ""green"""\n'
        'b.png,  two\n'
        ',orphan\n'.encode()
    )
    assert read_overrides(csv_path) == {"sub/a.png": 'red, blue and "green"', "b.png": "two"}


@pytest.mark.parametrize("text", ["a.png,caption one\n", "file,text\na.png,x\n", ""])
def test_read_overrides_requires_the_header(tmp_path, text):
    """Without a 'path,caption' header (or an empty file): ValueError naming the file."""
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(text)
    with pytest.raises(ValueError, match=r"captions\.csv: needs a header"):
        read_overrides(csv_path)


def test_read_overrides_row_without_caption_is_named(tmp_path):
    """A row with no caption column is an error naming file and line, not a crash."""
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("path,caption\na.png,ok\nb.png\n")
    with pytest.raises(ValueError, match=r"captions\.csv:3"):
        read_overrides(csv_path)


# --- BLIP -------------------------------------------------------------------------------------


def test_blip_with_missing_model_folder_names_the_path(ds, tmp_path):
    """captioner 'blip' with a mistyped model path: FileNotFoundError naming that path."""
    write_image(ds.root / "a.png")
    missing = str(tmp_path / "models" / "blip-typo")
    with pytest.raises(FileNotFoundError, match="blip-typo"):
        ds.caption(CaptionSettings(captioner="blip", blip_model=missing))


def test_blip_captioner_id_follows_model_content(tmp_path):
    """Without an explicit hash the BLIP cache id is the model folder's content, not its path."""
    a, b = tmp_path / "blip-a", tmp_path / "blip-b"
    for folder, weights in ((a, b"\1" * 64), (b, b"\2" * 64)):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(weights)
    shutil.copytree(a, tmp_path / "copy-of-a")

    def cid(path, model_hash=""):
        return CaptionSettings(captioner="blip", blip_model=str(path),
                               blip_model_hash=model_hash).captioner_id()

    assert cid(a) != cid(b)
    assert cid(a) == cid(tmp_path / "copy-of-a")
    assert cid(tmp_path / "nowhere").startswith("blip-")
    assert cid(a, "h1") == cid(b, "h1") != cid(a, "h2")


def make_tiny_blip(folder: Path) -> None:
    """A randomly initialised, tiny BLIP captioning model and processor, built offline."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "cat"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=32)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(words), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
            "encoder_hidden_size": 16, "bos_token_id": 2, "sep_token_id": 3,
            "pad_token_id": 0, "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_blip_captions_real_model_and_cache(ds, tmp_path, monkeypatch):
    """The real BLIP path on a tiny random model: captions generated, cached, then reused."""
    pytest.importorskip("transformers")
    model_dir = tmp_path / "tiny-blip"
    make_tiny_blip(model_dir)
    write_image(ds.root / "a.png", colour=(200, 0, 0))
    write_image(ds.root / "b.png", colour=(0, 0, 200), size=(48, 32))
    (ds.root / "b.txt").write_text("mine")
    blip = CaptionSettings(captioner="blip", blip_model=str(model_dir), prefix="p: ")
    counts, recs = ds.caption(blip)
    assert counts["blip"] == 1 and recs["b.png"]["source"] == "sidecar"
    text = recs["a.png"]["caption"]
    assert isinstance(text, str) and text.startswith("p: ")
    again = captions.blip_captions([ds.root / "a.png"], str(model_dir))
    assert ["p: " + t for t in again] == [text]  # deterministic

    def must_not_run(*args, **kwargs):
        raise AssertionError("BLIP ran although its caption is cached")

    monkeypatch.setattr(captions, "blip_captions", must_not_run)
    counts, recs = ds.caption(blip)
    assert recs["a.png"]["source"] == "cache" and recs["a.png"]["caption"] == text


def test_caption_variants_keep_tokens_shuffle_and_dropout():
    from lorapipe.captions import VariantSettings, caption_variant

    cap = "mycat, sofa, red, blue, green, window, lamp"
    shuf = VariantSettings(caption_variants=4, shuffle_captions=True, keep_tokens=1)
    vs = [caption_variant(cap, "k1", i, shuf) for i in range(4)]
    assert vs == [caption_variant(cap, "k1", i, shuf) for i in range(4)]  # reproducible
    assert all(v.startswith("mycat, ") for v in vs)
    assert all(sorted(v.split(", ")) == sorted(cap.split(", ")) for v in vs)
    assert len(set(vs)) > 1
    assert vs != [caption_variant(cap, "k2", i, shuf) for i in range(4)]  # per sample
    keep3 = VariantSettings(caption_variants=1, shuffle_captions=True, keep_tokens=3)
    assert caption_variant(cap, "k1", 0, keep3).startswith("mycat, sofa, red, ")
    # without shuffle or dropout a variant is the caption (tags normalised), order kept
    assert caption_variant(cap, "k1", 0, VariantSettings(1)) == cap
    drop = VariantSettings(caption_variants=8, keep_tokens=1, tag_dropout=0.5)
    dropped = [caption_variant(cap, "k1", i, drop).split(", ") for i in range(8)]
    assert all(d[0] == "mycat" for d in dropped)
    assert any(len(d) < 7 for d in dropped) and any(len(d) > 1 for d in dropped)
    assert all(d == [t for t in cap.split(", ") if t in d] for d in dropped)  # order kept
    assert caption_variant("just one", "k", 0, shuf) == "just one"


def test_merge_captions_makes_one_editable_csv_that_reads_back_as_edits(tmp_path):
    import csv
    import json

    from lorapipe.captions import merge_captions, read_overrides
    from lorapipe.io import write_checksum

    rows = [
        [{"path": "b/2.png", "sha256": "x", "caption": 'say "hi", ok', "source": "template"}],
        [{"path": "a.png", "sha256": "y", "caption": "line\nbreak, ünï", "source": "sidecar"},
         {"path": "c.png", "sha256": "z", "caption": "", "source": "edit"}],
    ]
    paths = []
    for i, shard in enumerate(rows):
        p = tmp_path / f"{i:05d}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in shard), encoding="utf-8")
        write_checksum(p)
        paths.append(str(p))
    out = tmp_path / "review.csv"
    counts = merge_captions(paths, out)
    assert counts == {"template": 1, "sidecar": 1, "edit": 1}
    with open(out, newline="", encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert [r["path"] for r in got] == ["a.png", "b/2.png", "c.png"]
    assert got[0]["caption"] == "line\nbreak, ünï" and got[1]["caption"] == 'say "hi", ok'
    assert read_overrides(out) == {"a.png": "line\nbreak, ünï", "b/2.png": 'say "hi", ok',
                                   "c.png": ""}
    (tmp_path / "00000.jsonl").write_text("damaged\n")
    with pytest.raises(Exception, match="00000.jsonl"):
        merge_captions(paths, out)


# --- user-written text files (issue 16) -------------------------------------------------------


def test_captions_csv_not_utf8_names_the_file(tmp_path):
    """It failed with a bare UnicodeDecodeError naming no file (a sidecar got a clear one)."""
    p = tmp_path / "captions.csv"
    p.write_bytes("path,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"captions\.csv: not UTF-8 text .*CSV UTF-8"):
        read_overrides(p)


def test_unquoted_comma_in_a_caption_is_an_error_not_a_cut(tmp_path):
    """`a.png,red, blue` gave the caption "red" without a word."""
    p = tmp_path / "captions.csv"
    p.write_text("path,caption\na.png,red, blue\n")
    with pytest.raises(ValueError, match=r"captions\.csv:2: more cells than the header .*double"):
        read_overrides(p)
    p.write_text('path,caption,source\na.png,"red, blue",edit\n')  # the review file's columns
    assert read_overrides(p) == {"a.png": "red, blue"}


def test_two_captions_for_one_image_name_both_lines(tmp_path):
    p = tmp_path / "captions.csv"
    p.write_text("path,caption\na.png,one\nb.png,x\n./a.png,two\n")
    with pytest.raises(ValueError, match=r"captions\.csv:4: a\.png already has another caption on "
                       r"line 2"):
        read_overrides(p)
    p.write_text("path,caption\na.png,one\na.png,one\n")  # the same row twice: harmless
    assert read_overrides(p) == {"a.png": "one"}


def test_rows_that_match_no_image_are_reported_with_the_closest(ds, tmp_path):
    """A typo or a case difference used to drop the edit silently: each is a warning naming the
    row and the image it likely meant, and a row of captions_unmatched.tsv."""
    from lorapipe.captions import report_unmatched

    for rel in ("Cat01.png", "sub/dog.png", "bird.png"):
        write_image(ds.root / rel)
    (ds.root / "captions.csv").write_text(
        "path,caption\ncat01.png,a cat\nsub\\dog.png,a dog\nbrid.png,a bird\nzebra.png,z\n"
        "bird.png,fine\n"
    )
    warnings: list[str] = []
    out = tmp_path / "results" / "captions_unmatched.tsv"
    rows = report_unmatched(ds.root, out, warn=warnings.append)
    assert rows == [(2, "cat01.png", "Cat01.png"), (3, "sub\\dog.png", "sub/dog.png"),
                    (4, "brid.png", "bird.png"), (5, "zebra.png", None)]  # fmt: skip
    assert warnings[0].endswith(
        "captions.csv:2: 'cat01.png' matches no image (did you mean 'Cat01.png'?): its caption "
        "is unused")
    assert "zebra.png' matches no image: its caption is unused" in warnings[3]
    assert out.read_text().splitlines() == [
        "line\tpath\tclosest", "2\tcat01.png\tCat01.png", "3\tsub\\dog.png\tsub/dog.png",
        "4\tbrid.png\tbird.png", "5\tzebra.png\t"]  # fmt: skip
    (ds.root / "captions.csv").write_text("path,caption\nbird.png,fine\n")
    assert report_unmatched(ds.root, out, warn=warnings.append) == []
    assert not out.exists()  # fixed: the list goes away


def test_unicode_normal_form_difference_is_suggested(ds, tmp_path):
    """macOS writes names decomposed (NFD); a typed caption row is composed (NFC)."""
    import unicodedata

    from lorapipe.captions import report_unmatched

    nfd = unicodedata.normalize("NFD", "café.png")
    write_image(ds.root / nfd)
    (ds.root / "captions.csv").write_text("path,caption\ncafé.png,x\n", encoding="utf-8")
    rows = report_unmatched(ds.root, tmp_path / "u.tsv", warn=lambda m: None)
    assert rows == [(2, "café.png", nfd)]


def test_edit_of_a_rejected_image_is_logged_as_unused(ds, caplog):
    write_image(ds.root / "ok.png")
    (ds.root / "broken.png").write_bytes(b"")
    with caplog.at_level("WARNING"):
        ds.caption(overrides={"broken.png": "never used", "ok.png": "mine"})
    assert "captions.csv row 'broken.png': the image is rejected (empty" in caplog.text


def test_template_error_at_job_start_names_the_dataset(ds, tmp_path):
    """A template that slipped past the config check (an old config) names its dataset key."""
    write_image(ds.root / "a.png")
    manifest = tmp_path / "m.jsonl"
    scan_shard(ds.root, ["a.png"], SCAN, manifest)
    bad = CaptionSettings(captioner="template", template="a {subject}")
    with pytest.raises(ValueError, match=r"datasets\.cats\.caption_template: 'a \{subject\}' cannot"
                       r" be filled in \(KeyError"):
        caption_shard(ds.root, manifest, bad, ds.cache, tmp_path / "c.jsonl", dataset="cats")


def test_blip_and_none_errors_name_the_dataset(ds, tmp_path):
    write_image(ds.root / "a.png")
    manifest = tmp_path / "m.jsonl"
    scan_shard(ds.root, ["a.png"], SCAN, manifest)
    blip = CaptionSettings(captioner="blip", blip_model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"datasets\.cats\.blip_model: BLIP model folder"):
        caption_shard(ds.root, manifest, blip, ds.cache, tmp_path / "c.jsonl", dataset="cats")
    with pytest.raises(FileNotFoundError, match=r"datasets\.cats\.captioner 'none' needs"):
        caption_shard(ds.root, manifest, CaptionSettings(captioner="none"), ds.cache,
                      tmp_path / "c.jsonl", dataset="cats")  # fmt: skip
