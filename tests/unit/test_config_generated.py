"""Generated bad configs: for every key of the schema, invalid values of every kind it can be
given (wrong type, out of range, not finite, unknown choice, empty, bad pattern, whole floats for
integers, null where none is allowed, unknown nested keys). Each must fail load_config with one
line naming that key, before any job (hypothesis is not in the environment: the generator is
written out here, deterministic, plus a seeded sample of two bad keys at once)."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import yaml

from lorapipe.config import ConfigError, load_config, load_yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
BASE = load_yaml(REPO / "config" / "config.yaml")
BASE["sweeps"] = {}  # filled per case where a sweep key is tested


def _types(spec: dict) -> list[str]:
    t = spec.get("type", ["object"] if "$ref" in spec else [])
    return t if isinstance(t, list) else [t]


def _number_values(spec: dict, types: list[str]) -> list:
    """Out-of-range, non-finite and wrongly typed values for a number or integer key."""
    integer = "integer" in types and "number" not in types
    step = 1 if integer else 0.5
    out: list = [math.nan, math.inf, -math.inf, "7"]
    if "minimum" in spec:
        out.append(spec["minimum"] - step)
    if "exclusiveMinimum" in spec:
        out.append(spec["exclusiveMinimum"])
    if "maximum" in spec:
        out.append(spec["maximum"] + step)
    if "exclusiveMaximum" in spec:
        out.append(spec["exclusiveMaximum"])
    if "multipleOf" in spec:
        out.append(spec.get("minimum", 0) + spec["multipleOf"] // 2 or 1)
    if integer:
        out += [2.5, float(spec.get("minimum", 1) + 1)]  # 2.0 is not an integer either
    return out


def invalid_values(spec: dict) -> list:
    """Values the schema (or a check beside it) must refuse for a key with this spec."""
    types = _types(spec)
    out: list = []
    if "enum" in spec:
        out += ["not-a-choice", 3.5, []]
    if {"number", "integer"} & set(types):
        out += _number_values(spec, types)
    if "string" in types:
        out += [["x"], {"a": 1}] + ([] if {"number", "integer"} & set(types) else [5])
        if spec.get("minLength"):
            out.append("")
        if "pattern" in spec:
            out.append("%% no match %%")
    if "boolean" in types:
        out += ["yes", 1]
    if "array" in types:
        out += ["text", [5]]
        if spec.get("minItems"):
            out.append([])
        if "pattern" in spec.get("items", {}):
            out.append(["has space"])
    if "object" in types:
        out += ["text", 5, {"no_such_key": 1}]
    if "null" not in types and "enum" not in spec and "$ref" not in spec:
        out.append(None)
    return out


def leaf_keys() -> list[tuple[tuple[str, ...], dict]]:
    """(path in a config, spec) of every key the schema defines, nested objects included."""
    defs = SCHEMA["$defs"]
    blocks = [
        (("mlflow",), SCHEMA["properties"]["mlflow"]),
        (("datasets", "demo"), defs["dataset"]),
        (("base_models", "tiny-sd"), defs["base_model"]),
        (("runs", "demo"), defs["run_settings"]),
        (("defaults",), defs["run_settings"]),
        (("sweeps", "sw"), SCHEMA["properties"]["sweeps"]["additionalProperties"]),
    ]
    out = []
    for prefix, block in blocks:
        for key, spec in block["properties"].items():
            out.append((prefix + (key,), spec))
            for sub, subspec in spec.get("properties", {}).items():
                out.append((prefix + (key, sub), subspec))
    return out


def place(cfg: dict, path: tuple[str, ...], value) -> None:
    """Put ``value`` at ``path`` (creating the sweep and nested objects it needs)."""
    if path[0] == "sweeps":
        cfg["sweeps"]["sw"] = {"table": "t.tsv"}
    node = cfg
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[path[-1]] = value


CASES = [
    pytest.param(path, value, id=f"{'.'.join(path)}={value!r}")
    for path, spec in leaf_keys()
    for value in invalid_values(spec)
] + [
    pytest.param(prefix + ("no_such_key",), 1, id=f"{'.'.join(prefix)}.no_such_key")
    for prefix in [("mlflow",), ("datasets", "demo"), ("base_models", "tiny-sd"),
                   ("runs", "demo"), ("defaults",), ("sweeps", "sw"), ()]
]  # fmt: skip


@pytest.mark.parametrize(("path", "value"), CASES)
def test_every_key_refuses_every_kind_of_bad_value_in_one_line_naming_it(path, value):
    cfg = copy.deepcopy(BASE)
    place(cfg, path, value)
    with pytest.raises(ConfigError) as e:
        load_config(cfg, check_files=False)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith("invalid config: "), msg
    assert ".".join(path[:-1] if path[-1] == "no_such_key" else path) in msg, msg


def test_the_generator_covers_every_key():
    """Every key of the schema gets at least two bad values (the count is in the report)."""
    keys = leaf_keys()
    assert len(keys) >= 60
    for path, spec in keys:
        assert len(invalid_values(spec)) >= 2, path
    assert len(CASES) >= 300


def test_two_bad_keys_at_once_are_both_named_one_line_each():
    """A seeded sample of pairs: every problem is listed, each on its own line."""
    rng = random.Random(0)
    singles = [(p, v) for p, spec in leaf_keys() for v in invalid_values(spec)
               if p[0] not in ("sweeps",) and p[-1] not in ("dataset", "base_model")]  # fmt: skip
    for _ in range(60):
        (pa, va), (pb, vb) = rng.sample(singles, 2)
        if pa[:2] == pb[:2] and (pa[-1] in pb or pb[-1] in pa):
            continue  # a key and its nested key: one hides the other
        cfg = copy.deepcopy(BASE)
        place(cfg, pa, va)
        place(cfg, pb, vb)
        with pytest.raises(ConfigError) as e:
            load_config(cfg, check_files=False)
        lines = str(e.value).splitlines()
        for path in (pa, pb):
            assert any(".".join(path) in line for line in lines), (path, lines)
