"""Property-based fuzzing of the trust boundary: mutate a valid zoo the way a stranger could
(shard bytes, Parquet footers, safetensors headers and data of weights cells, manifest fields,
the README header) and hold every entry point to one rule:

    it raises a ``LoraZooError`` that names a file, or it returns exactly what the independent
    reference reader (``tests/reference/zoo_reader.py``: pyarrow + safetensors' own loader +
    the row's adapter_config) returns.

A zoo the reference refuses as a whole (hash, size, rows, a shard listed twice, repeated ids...)
must be refused by ``load_zoo(verify=True)``; a cell the reference refuses must be refused by
every path that decodes it. ``derandomize`` keeps CI reproducible (the same examples every run);
``LORA_ZOO_FUZZ_EXAMPLES`` raises the count for a longer local hunt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lora_zoo.errors import LoraZooError
from tests.reference.zoo_reader import RefusedByReference, decode_cell, read_reference

EXAMPLES = int(os.environ.get("LORA_ZOO_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    # no shrinking: a failure is reported as generated (shrinking a decode failure through
    # Parquet rewrites takes minutes); the mutation tuple is short enough to read as it is
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# ---- a valid zoo, copied per example --------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from tests.fixtures.zoos import make_zoo

    return make_zoo(tmp_path_factory.mktemp("fuzz") / "z", n=6, shard_max_rows=3,
                    splits={"train": 0.5, "test": 0.5})  # fmt: skip


def _manifest(root: Path) -> dict:
    return json.loads((root / "lora_zoo.json").read_text())


def _shards(root: Path) -> list[dict]:
    return [sh for sp in _manifest(root)["splits"].values() for sh in sp["shards"]]


def _rehash(root: Path, rel: str) -> None:
    """Make the manifest honest about ``rel``'s new bytes (only the payload stays hostile)."""
    m = _manifest(root)
    data = (root / rel).read_bytes()
    for sp in m["splits"].values():
        for sh in sp["shards"]:
            if sh["path"] == rel:
                sh["num_bytes"], sh["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        sp["num_bytes"] = sum(sh["num_bytes"] for sh in sp["shards"])
    (root / "lora_zoo.json").write_text(json.dumps(m, indent=1))


# ---- mutations -------------------------------------------------------------------------------
def _flip(root: Path, which: int, pos: int, xor: int, rehash: bool, from_end: bool) -> None:
    rel = _shards(root)[which % len(_shards(root))]["path"]
    blob = bytearray((root / rel).read_bytes())
    i = len(blob) - 1 - pos % len(blob) if from_end else pos % len(blob)
    blob[i] ^= xor
    (root / rel).write_bytes(bytes(blob))
    if rehash:
        _rehash(root, rel)


def _edit_cell(blob: bytes, edit: tuple) -> bytes:
    """A safetensors cell with one structural or content change, the rest left intact."""
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    kind, a, b = edit
    names = sorted(k for k in header if k != "__metadata__")
    key = names[a % len(names)]
    if kind == "offset":
        header[key]["data_offsets"][b % 2] += (b // 2) % 17 - 8
    elif kind == "dtype":
        header[key]["dtype"] = ["F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "BOOL"][b % 7]
    elif kind == "shape":
        shape = header[key]["shape"]
        shape[b % len(shape)] = max(0, shape[b % len(shape)] + (b // 2) % 5 - 2)
    elif kind == "swap_shape":
        header[key]["shape"] = header[key]["shape"][::-1]
    elif kind == "rename":
        header[
            key.replace("lora_A", "lora_B")
            if "lora_A" in key
            else key.replace("lora_B", "lora_A") + ".x"
        ] = header.pop(key)
    elif kind == "config":
        meta = header.setdefault("__metadata__", {})
        cfg = json.loads(meta.get("lora_zoo.config", "{}"))
        cfg[["r", "lora_alpha", "use_rslora", "rank_pattern"][b % 4]] = [
            1,
            1000.0,
            True,
            {"q_proj": 1},
        ][b % 4]
        meta["lora_zoo.config"] = json.dumps(cfg)
    elif kind == "plain_peft":
        header["__metadata__"] = {"format": "pt"}  # another tool's plain PEFT bytes
    elif kind == "append":
        data += b"\0" * (1 + b % 16)
    elif kind == "data":
        arr = bytearray(data)
        arr[b % len(arr)] ^= 0xFF  # may make a NaN / inf: the reference decides
        data = bytes(arr)
    elif kind == "duplicate_name":
        text = json.dumps(header)
        dup = json.dumps({key: header[key]})[1:-1]
        raw = ("{" + dup + "," + text[1:]).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw + data
    elif kind == "header_len":
        return (n + (b % 64) - 32).to_bytes(8, "little", signed=False) + blob[8:]
    elif kind == "nest":
        header["__metadata__"] = {"x": "y"}
        text = (
            json.dumps(header)[:-1]
            + ', "deep": '
            + "[" * (50 + b * 1000)
            + "]" * (50 + b * 1000)
            + "}"
        )
        raw = text.encode()
        return len(raw).to_bytes(8, "little") + raw + data
    elif kind == "utf8":
        raw = bytearray(json.dumps(header).encode())
        raw[2 + b % 10] = 0xFF
        return len(raw).to_bytes(8, "little") + bytes(raw) + data
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def _mutate_cell(root: Path, which: int, row: int, edit: tuple) -> None:
    rel = _shards(root)[which % len(_shards(root))]["path"]
    t = pq.read_table(root / rel)
    w = t.column("weights").to_pylist()
    j = row % len(w)
    w[j] = _edit_cell(w[j], edit)
    col = t.schema.get_field_index("weights")
    t = t.set_column(col, t.schema.field("weights"), pa.array(w, t.schema.field("weights").type))
    pq.write_table(t.replace_schema_metadata(t.schema.metadata), root / rel, row_group_size=2)
    _rehash(root, rel)


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [path] + [p for k, v in obj.items() for p in _leaves(v, (*path, k))]
    if isinstance(obj, list):
        return [path] + [p for i, v in enumerate(obj) for p in _leaves(v, (*path, i))]
    return [path]


def _mutate_manifest(root: Path, pick: int, value: Any, delete: bool) -> None:
    m = _manifest(root)
    paths = [p for p in _leaves(m) if p]
    path = paths[pick % len(paths)]
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    elif delete and isinstance(parent, list):
        parent.append(parent[path[-1]])  # list an entry twice (a shard, a column...)
    else:
        parent[path[-1]] = value
    (root / "lora_zoo.json").write_text(json.dumps(m))


def _mutate_readme(root: Path, header: str) -> None:
    text = (root / "README.md").read_text()
    body = text.split("---", 2)[2] if text.startswith("---") else text
    (root / "README.md").write_text(f"---\n{header}\n---{body}")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
CELL_EDITS = st.tuples(
    st.sampled_from(["offset", "dtype", "shape", "swap_shape", "rename", "config", "plain_peft",
                     "append", "data", "duplicate_name", "header_len", "nest", "utf8"]),
    st.integers(0, 64),
    st.integers(0, 400),
)  # fmt: skip
YAML_HEADERS = st.sampled_from([
    "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]",
    "configs: 7",
    "configs:\n- config_name: default\n  data_files: [{split: train, path: ../../etc/passwd}]",
    "[" * 400 + "]" * 400,
    "!!python/object/apply:os.system ['true']",
    "key: !!binary AAAA",
    ": : :",
]) | st.text(max_size=40)  # fmt: skip
MUTATIONS = st.one_of(
    st.tuples(st.just("bytes"), st.integers(0, 9), st.integers(0, 10**6), st.integers(1, 255),
              st.booleans(), st.booleans()),
    st.tuples(st.just("cell"), st.integers(0, 9), st.integers(0, 9), CELL_EDITS),
    st.tuples(st.just("manifest"), st.integers(0, 500), JSON_VALUES, st.booleans()),
    st.tuples(st.just("readme"), YAML_HEADERS),
)  # fmt: skip


def _apply(root: Path, mutation: tuple) -> None:
    kind, *args = mutation
    if kind == "bytes":
        which, pos, xor, rehash, from_end = args
        _flip(root, which, pos % 600 if from_end else pos, xor, rehash, from_end)
    elif kind == "cell":
        _mutate_cell(root, *args)
    elif kind == "manifest":
        _mutate_manifest(root, *args)
    else:
        _mutate_readme(root, *args)


# ---- the property -------------------------------------------------------------------------
def _named(e: LoraZooError) -> None:
    assert e.file, f"{type(e).__name__} names no file: {e}"


def _same_module(got_a, got_b, scale: float, ref) -> None:
    assert got_a.dtype == ref.A.dtype and torch.equal(got_a, ref.A)
    assert got_b.dtype == ref.B.dtype and torch.equal(got_b, ref.B)
    assert math.isclose(scale, ref.scale, rel_tol=1e-12), (scale, ref.scale)


def _same_factors(u: torch.Tensor, v: torch.Tensor, ref) -> None:
    """The fold multiplies each stored value once by sqrt(|scale|) (rounded): at most 2 ulps of
    the stored dtype per element, relative to the float64 product."""
    ru, rv = ref.factors()
    tol = 2 * _EPS.get(u.dtype, 2.0**-52)
    for got, want in ((u, ru), (v, rv)):
        assert got.shape == want.shape
        assert torch.allclose(got.double(), want, rtol=tol, atol=0.0), (got, want)


def _check_records(split, ref_rows: dict) -> None:
    for lid, ref in ref_rows.items():
        try:
            rec = split.record(lid)
        except LoraZooError as e:
            _named(e)
            continue
        assert not isinstance(ref, RefusedByReference), f"{lid}: decoded, reference: {ref}"
        assert sorted(rec.modules) == sorted(ref)
        for name, m in rec.modules.items():
            _same_module(m.A, m.B, m.scale, ref[name])


def _check_dataset(split, ref_rows: dict) -> None:
    from lora_zoo.load.datasets import LoraDataset

    try:
        ds = LoraDataset(split, view="factors")
        n = len(ds)
    except LoraZooError as e:
        _named(e)
        return
    assert n == len(ref_rows)
    for i in range(n):
        try:
            item = ds[i]
        except LoraZooError as e:
            _named(e)
            continue
        ref = ref_rows[item["lora_id"]]
        assert not isinstance(ref, RefusedByReference), f"{item['lora_id']}: {ref}"
        assert item["lora_id"] == list(ref_rows)[i]
        assert sorted(item["modules"]) == sorted(ref)
        for name, mod in item["modules"].items():
            _same_factors(mod["U"], mod["V"], ref[name])


def _check_stream(split, ref_rows: dict) -> None:
    from lora_zoo.load.datasets import LoraIterableDataset

    seen = []
    try:
        for item in LoraIterableDataset(split, view="factors", shuffle_buffer=0):
            ref = ref_rows[item["lora_id"]]
            assert not isinstance(ref, RefusedByReference), f"{item['lora_id']}: {ref}"
            for name, mod in item["modules"].items():
                _same_factors(mod["U"], mod["V"], ref[name])
            seen.append(item["lora_id"])
    except LoraZooError as e:
        _named(e)
        return
    assert sorted(seen) == sorted(ref_rows)


def _check_export(root: Path, ref_rows: dict, out: Path) -> None:
    from lora_zoo.contrib.export import export_lora

    for lid, ref in list(ref_rows.items())[:2]:
        try:
            path = export_lora(root, lid, "peft", out / lid)
        except LoraZooError as e:
            _named(e)
            continue
        assert not isinstance(ref, RefusedByReference), f"{lid}: exported, reference: {ref}"
        got = decode_cell((path / "adapter_model.safetensors").read_bytes(),
                          (path / "adapter_config.json").read_text())  # fmt: skip
        assert sorted(got) == sorted(ref)
        for name, m in got.items():
            _same_module(m.A, m.B, m.scale, ref[name])


def _check_cli(root: Path, capsys) -> None:
    """The CLI never shows a traceback for zoo input: a LoraZooError becomes one line + exit 1,
    anything else escapes ``main`` and fails this test."""
    from lora_zoo.cli import main

    for verb in (["info", str(root)], ["verify", str(root)]):
        assert main(verb) in (0, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err


@FUZZ
@given(mutation=MUTATIONS)
def test_every_entry_point_refuses_by_name_or_matches_the_reference(
    mutation, good, tmp_path_factory, capsys
):
    from lora_zoo.load.source import load_zoo

    work = tmp_path_factory.mktemp("m")
    root = work / "z"
    shutil.copytree(good, root)
    _apply(root, mutation)
    try:
        ref = read_reference(root)
    except RefusedByReference:
        ref = None
    try:
        zoo = load_zoo(root, verify=True)
    except LoraZooError as e:
        _named(e)
        zoo = None
    if ref is None:
        assert zoo is None, f"verify passed a zoo the reference refuses ({mutation})"
    else:
        if zoo is not None:
            assert sorted(zoo.splits) == sorted(ref)
            for s in zoo.splits:
                try:
                    ids = zoo[s].ids
                except LoraZooError as e:
                    _named(e)
                    continue
                assert ids == list(ref[s]), s
                _check_records(zoo[s], ref[s])
                _check_dataset(zoo[s], ref[s])
                _check_stream(zoo[s], ref[s])
            _check_export(
                root, {k: v for rows in ref.values() for k, v in rows.items()}, work / "x"
            )
    _check_cli(root, capsys)
