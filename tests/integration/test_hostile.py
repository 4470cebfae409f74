"""Hostile zoos served from a local folder, the stand-in Hub and moto S3: each is refused with
its named error (file + key), nothing is written outside the destination, nothing unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_zoo.errors import CorruptFileError, IntegrityError, LoraZooError
from lora_zoo.load.source import load_zoo
from lora_zoo.remote.pull import pull
from tests.fixtures.hostile import CASES, CELL_CASES, ESCAPE_NAME, ROW_CASES, plain_peft_cell
from tests.fixtures.hub_server import hub  # noqa: F401  (fixture)
from tests.fixtures.s3 import s3  # noqa: F401  (fixture)
from tests.fixtures.zoos import make_zoo


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("good") / "z", n=6, splits={"train": 0.5, "test": 0.5})


def _hostile(good: Path, tmp_path: Path, name: str, edit) -> Path:
    src = tmp_path / "remote" / name
    shutil.copytree(good, src)
    edit(src)
    return src


def _serve(backend: str, src: Path, request) -> str:
    if backend == "local":
        return f"file://{src}"
    if backend == "s3":
        url, bucket = request.getfixturevalue("s3")
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, skip_instance_cache=True)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            fs.pipe(f"{bucket}/{src.name}/{f.relative_to(src).as_posix()}", f.read_bytes())
        return f"s3://{bucket}/{src.name}"
    request.getfixturevalue("hub")
    from huggingface_hub import HfApi

    from lora_zoo.remote.address import hub_endpoint

    api = HfApi(endpoint=hub_endpoint(), token="hf_dummy_token")
    repo = f"mallory/{src.name.replace('_', '-')}"
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(folder_path=str(src), repo_id=repo, repo_type="dataset")
    return repo


def _outside(tmp_path: Path, dest: Path) -> list[Path]:
    """Files named like the escape target anywhere but inside the source copy."""
    hits = [p for p in tmp_path.rglob(ESCAPE_NAME) if "remote" not in p.parts]
    hits += [p for p in (Path("/tmp") / ESCAPE_NAME,) if p.exists()]
    return [p for p in hits if dest not in p.parents]


@pytest.mark.parametrize("backend", ["local", "s3", "hub"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_zoo_is_refused_and_contained(case, backend, good, tmp_path, request):
    edit, err, where = CASES[case]
    src = _hostile(good, tmp_path, case, edit)
    source = _serve(backend, src, request)
    dest = tmp_path / "a" / "b" / "c"
    with pytest.raises(err) as e:
        pull(source, dest, progress=False)
    assert where in f"{e.value.file}: {e.value.key}", str(e.value)  # names the file and key
    assert _outside(tmp_path, dest) == []
    assert not (dest / "lora_zoo.json").exists()  # an unfinished pull is never a zoo


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_local_folder_is_refused_on_open_or_verify(case, good, tmp_path):
    edit, err, _where = CASES[case]
    src = _hostile(good, tmp_path, case, edit)
    with pytest.raises(LoraZooError) as e:
        load_zoo(src, verify=True)
    assert isinstance(e.value, (err, type(e.value))) and e.value.file


def _first_split(zoo) -> str:
    return next(s for s in zoo.splits if len(zoo[s]))


def _readers(src: Path, split: str, ids: list[str], out: Path) -> dict[str, object]:
    """Every entry point that decodes LoRAs, each reading ALL of ``ids`` (a zoo opened
    without verify: the readers must refuse the bytes themselves)."""
    from lora_zoo.contrib.export import export_lora
    from lora_zoo.load.datasets import LoraDataset, LoraIterableDataset

    def record():
        sp = load_zoo(src)[split]
        for lid in ids:
            sp.record(lid)
        for i in range(len(ids)):
            sp.record(i)

    def dataset():
        ds = LoraDataset(load_zoo(src)[split], view="factors")
        for i in range(len(ds)):
            ds[i]

    def streaming():
        list(LoraIterableDataset(load_zoo(src)[split], view="factors", batch_size=2))

    def export():
        for lid in ids:
            export_lora(src, lid, "peft", out / lid)

    return {"record": record, "dataset": dataset, "streaming": streaming, "export": export}


@pytest.mark.parametrize("backend", ["local", "s3", "hub"])
@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_hostile_rows_pull_but_fail_verify_and_every_reader(case, backend, good, tmp_path, request):
    """Honest hashes, lying structure: the pull succeeds (bytes are as listed), then `verify`
    and every reader refuse the shard with a named error (never a wrong LoRA, never a
    pyarrow traceback)."""
    edit, err, where = ROW_CASES[case]
    ids = load_zoo(good)[_first_split(load_zoo(good))].ids
    split = _first_split(load_zoo(good))
    dest = tmp_path / "pulled"
    pull(_serve(backend, _hostile(good, tmp_path, case, edit), request), dest, progress=False)
    with pytest.raises(IntegrityError) as e:
        load_zoo(dest, verify=True)
    assert "data/" in str(e.value)
    for name, read in _readers(dest, split, ids, tmp_path / "out").items():
        with pytest.raises(err) as e:
            read()
        assert where in f"{e.value.key}" and ".parquet" in str(e.value.file), (name, e.value)


@pytest.mark.parametrize("case", sorted(CELL_CASES))
def test_hostile_weight_cells_are_refused_when_decoded(case, good, tmp_path, monkeypatch):
    from lora_zoo.cli.zoo import summarize

    edit, err = CELL_CASES[case]
    src = _hostile(good, tmp_path, case, edit)
    monkeypatch.chdir(tmp_path)
    zoo = load_zoo(src, verify=True)  # the bytes are what the manifest says: only decoding fails
    split = _first_split(zoo)
    first = zoo[split].ids[0]
    for name, read in _readers(src, split, [first], tmp_path / "out").items():
        with pytest.raises(err) as e:
            read()
        assert e.value.file and first in e.value.file, (name, e.value)
    if err is CorruptFileError:  # `info` reads the first cell's header: the same decoder
        with pytest.raises(err):
            summarize(load_zoo(src))
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


# ---- symlinks (a local folder is the one source that can hold them) ---------------------------
def test_pull_of_a_local_folder_never_copies_a_symlink_to_a_secret(good, tmp_path):
    from lora_zoo.remote.address import parse_source, resolve_fsspec
    from lora_zoo.remote.pull import download_zoo

    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    src = _hostile(good, tmp_path, "linked", lambda r: (r / "notes.txt").symlink_to(secret))
    dest = tmp_path / "dest"
    fs, root = resolve_fsspec(parse_source(f"file://{src}"))
    download_zoo(fs, root, dest, extra=True, progress=False)
    assert not (dest / "notes.txt").exists()
    assert all(
        "s3cr3t" not in p.read_text(errors="replace") for p in dest.rglob("*") if p.is_file()
    )


def test_a_local_zoo_whose_shard_is_a_symlink_outside_is_refused(good, tmp_path):
    src = _hostile(good, tmp_path, "shard_link", lambda r: None)
    shard = sorted((src / "data").glob("*.parquet"))[0]
    outside = tmp_path / "outside.parquet"
    shutil.move(shard, outside)
    shard.symlink_to(outside)  # same bytes, same hash: only the link is hostile
    zoo = load_zoo(src)
    split = next(s for s in zoo.splits if shard.name in " ".join(zoo[s].shard_paths))
    with pytest.raises(LoraZooError) as e:
        zoo[split].record(0)
    assert shard.name in str(e.value) and "symlink" in str(e.value)
    with pytest.raises(LoraZooError):
        load_zoo(src, verify=True)


def test_pull_refuses_a_symlinked_folder_in_the_destination(good, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "data").symlink_to(outside)
    with pytest.raises(LoraZooError, match="symlink"):
        pull(f"file://{good}", dest, progress=False)
    assert list(outside.iterdir()) == []


def test_plain_peft_cell_has_the_column_scale_in_every_loader(good, tmp_path):
    """A cell without an embedded config (another tool's PEFT bytes): record, both datasets
    and export all give ΔW = (alpha/r) B A with alpha, r from the adapter_config column,
    equal to safetensors' own loader plus that config."""
    import json

    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file

    from lora_zoo.contrib.export import export_lora
    from lora_zoo.load.datasets import LoraDataset, LoraIterableDataset

    src = _hostile(good, tmp_path, "plain", plain_peft_cell)
    zoo = load_zoo(src, verify=True)
    split = _first_split(zoo)
    lid, data, cfg_text = zoo[split].cell(0)
    cfg = json.loads(cfg_text)
    scale = cfg["lora_alpha"] / cfg["r"]
    assert scale != 1.0  # else the old map-style dataset's scale 1 would pass unnoticed
    ref = {}
    for k, a in st_load(data).items():
        if ".lora_A." in k:
            b = st_load(data)[k.replace(".lora_A.", ".lora_B.")]
            ref[k.removeprefix("base_model.model.").split(".lora_A.")[0]] = (scale * b @ a, b, a)

    def check(name: str, got: dict[str, torch.Tensor]) -> None:
        assert set(got) == set(ref), name
        for mod, (want, b, a) in ref.items():
            # fp32: each entry sums r products, each factor rounded once by the sqrt(scale)
            # fold: |err| <= 4 r eps32 * scale * (|B| @ |A|)
            bound = 4 * a.shape[0] * torch.finfo(torch.float32).eps * scale * (b.abs() @ a.abs())
            assert ((got[mod] - want).abs() <= bound + 1e-30).all(), (name, mod)

    check("record", zoo[split].record(lid).delta_weights())
    item = LoraDataset(zoo[split], view="factors")[0]
    assert item["lora_id"] == lid
    check("dataset", {n: m["U"] @ m["V"].T for n, m in item["modules"].items()})
    it = next(iter(LoraIterableDataset(zoo[split], view="factors")))
    assert it["lora_id"] == lid
    check("streaming", {n: m["U"] @ m["V"].T for n, m in it["modules"].items()})
    out = export_lora(src, lid, "peft", tmp_path / "exported")
    ecfg = json.loads((out / "adapter_config.json").read_text())
    est = load_file(out / "adapter_model.safetensors")
    escale = ecfg["lora_alpha"] / ecfg["r"]
    exported = {
        k.removeprefix("base_model.model.").split(".lora_A.")[0]: escale
        * est[k.replace(".lora_A.", ".lora_B.")]
        @ v
        for k, v in est.items()
        if ".lora_A." in k
    }
    check("export", exported)
