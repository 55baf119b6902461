"""Which images of a dataset are held out for validation, and never trained on.

A dataset holds out images with ``validation_split`` (a fraction below 1, or a whole number of
images) or validates on another dataset, ``validation_dataset`` (all of its images; the dataset
itself then trains on every image). The choice is made per image from a stable hash of its key
(`key_hash`: sha256 of the key, which is `shards.sample_key` of its path), never from a random
draw or from the other images:

- a fraction holds out exactly the images whose hash is below it: adding, removing or editing
  other images never moves an image between the two sides;
- a count holds out the ``n`` images of lowest hash: adding images never moves one from training
  to validation; an added image whose hash is lower than the highest held-out one takes its place
  (that one trains from then on), at most one per added image. Prefer a fraction for a dataset
  that grows.

It is a selection over the cached latents, at training time: captions, shards and latents are
the same with any split. Stdlib only (the workflow plans with it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SALT = "lorapipe-validation"


def key_hash(key: str) -> float:
    """A number in [0, 1) from an image's key alone (the same on every machine and run)."""
    h = hashlib.sha256(f"{SALT}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass(frozen=True)
class Holdout:
    """The validation images of one dataset's runs: a split of it, or another dataset."""

    owner: str  # the dataset the runs train on
    split: float | int | None = None  # fraction (float below 1) or count (int)
    dataset: str | None = None  # validation_dataset: every image of it validates

    @classmethod
    def of(cls, name: str, settings: Mapping[str, Any]) -> Holdout:
        """The holdout of dataset ``name`` (its config block, defaults filled)."""
        return cls(name, settings.get("validation_split"), settings.get("validation_dataset"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Holdout | None:
        return None if not d else cls(d["owner"], d.get("split"), d.get("dataset"))

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "split": self.split, "dataset": self.dataset}

    @property
    def active(self) -> bool:
        return self.split is not None or self.dataset is not None

    @property
    def key(self) -> str:
        """The config key that sets it (named in errors)."""
        what = "validation_split" if self.split is not None else "validation_dataset"
        return f"datasets.{self.owner}.{what}"

    def describe(self) -> str:
        if self.dataset is not None:
            return f"dataset {self.dataset}"
        if isinstance(self.split, float):
            return f"{self.split:g} of dataset {self.owner} (validation_split, by key hash)"
        return f"{self.split} image(s) of dataset {self.owner} (validation_split, by key hash)"

    def held_out(self, keys: Iterable[str]) -> set[str]:
        """The keys (of the training dataset's images) that validate instead of training."""
        if self.split is None:
            return set()
        keys = set(keys)
        if isinstance(self.split, float):
            return {k for k in keys if key_hash(k) < self.split}
        return set(sorted(keys, key=lambda k: (key_hash(k), k))[: self.split])

    def split_samples(self, samples: Sequence[Mapping]) -> tuple[list, list]:
        """(training, validation) samples of the training dataset, each in the given order;
        only each sample's ``"key"`` is read."""
        out = self.held_out(s["key"] for s in samples)
        train = [s for s in samples if s["key"] not in out]
        return train, [s for s in samples if s["key"] in out]

    def counts(self, keys: Sequence[str], validation_keys: Sequence[str] = ()) -> dict[str, Any]:
        """How many images each side has: ``keys`` of the training dataset, ``validation_keys``
        of a validation dataset."""
        out = self.held_out(keys)
        return {
            "source": self.describe(),
            "train_images": len(set(keys)) - len(out),
            "validation_images": len(out) + len(set(validation_keys)),
        }

    def no_training_image(self, n_images: int, what: str = "valid") -> str:
        """The config error of a split that leaves no image to train on."""
        return (
            f"{self.key}: {self.split!r} leaves no training image (the dataset has {n_images} "
            f"{what} image(s)): hold out fewer"
        )


def settings_problems(config: Mapping[str, Any]) -> list[str]:
    """What a schema cannot check about the holdout keys (datasets validated, defaults filled)."""
    out = []
    datasets = config["datasets"]
    for name, ds in datasets.items():
        split, other = ds.get("validation_split"), ds.get("validation_dataset")
        key = f"datasets.{name}"
        if isinstance(split, float) and split >= 1:
            out.append(
                f"{key}.validation_split: {split:g}: a fraction must be below 1 (0.1 holds out "
                "10 %); a number of images is a whole number such as 5"
            )
        if split is not None and other is not None:
            out.append(
                f"{key}.validation_dataset: set either validation_split or validation_dataset, "
                "not both"
            )
        if other is not None and other not in datasets:
            have = ", ".join(datasets)
            out.append(f"{key}.validation_dataset: unknown dataset {other!r} (have: {have})")
        elif other == name:
            out.append(
                f"{key}.validation_dataset: a dataset cannot validate on itself (use "
                "validation_split to hold out part of it)"
            )
    return out


def listing_problem(holdout: Holdout, relpaths: Sequence[str]) -> str | None:
    """Before any job: a split that holds out every listed image (rejected images are only
    known later; training reports the same error then)."""
    if holdout.split is None or not relpaths:
        return None
    if isinstance(holdout.split, int):
        if holdout.split >= len(relpaths):
            return holdout.no_training_image(len(relpaths), "listed")
        return None
    from .shards import sample_key  # PIL: only when a dataset has a fractional split

    keys = [sample_key(r) for r in relpaths]
    if len(holdout.held_out(keys)) == len(keys):
        return holdout.no_training_image(len(keys), "listed")
    return None


def manifest_keys(manifest_jsonl: str) -> list[str]:
    """The keys of a merged manifest's valid images (what the shards hold)."""
    import json

    from .shards import sample_key

    with open(manifest_jsonl, encoding="utf-8") as fh:
        rows = [json.loads(x) for x in fh if x.strip()]
    return [sample_key(r["path"]) for r in rows if r.get("status") == "ok"]


def of_run(doc: Mapping[str, Any]) -> Holdout | None:
    """The holdout of a run's config.yaml document (its dataset block), or None."""
    ds = doc["dataset"]
    h = Holdout.of(ds["name"], ds)
    return h if h.active else None


def train_spec(doc: Mapping[str, Any], val_latents: Sequence[str] = ()) -> dict | None:
    """What the train stage gets (`train.train`'s ``validation``): the holdout of the run, and a
    validation dataset's latent shards."""
    h = of_run(doc)
    return None if h is None else {**h.to_dict(), "shards": [str(p) for p in val_latents]}


def config_block(dataset: Mapping[str, Any], manifest: str, val_manifest: str | None) -> dict:
    """config.yaml's ``validation`` block: where the validation images come from and how many
    images each side has (valid images of the manifests; {} without validation)."""
    h = Holdout.of(dataset["name"], dataset)
    if not h.active:
        return {}
    keys = manifest_keys(manifest)
    val_keys = manifest_keys(val_manifest) if h.dataset is not None and val_manifest else []
    return h.counts(keys, val_keys)
