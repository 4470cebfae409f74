"""Hostile zoos served from a local folder, the stand-in Hub and moto S3: each is refused with
its named error (file + key), nothing is written outside the destination, nothing unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_zoo.errors import LoraZooError
from lora_zoo.load.source import load_zoo
from lora_zoo.remote.pull import pull
from tests.fixtures.hostile import CASES, CELL_CASES, ESCAPE_NAME
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

    from lora_zoo.remote.sources import hub_endpoint

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


@pytest.mark.parametrize("case", sorted(CELL_CASES))
def test_hostile_weight_cells_are_refused_when_decoded(case, good, tmp_path, monkeypatch):
    from lora_zoo.load.datasets import LoraDataset

    edit, err = CELL_CASES[case]
    src = _hostile(good, tmp_path, case, edit)
    monkeypatch.chdir(tmp_path)
    zoo = load_zoo(src, verify=True)  # the bytes are what the manifest says: only decoding fails
    split = next(s for s in zoo.splits if len(zoo[s]))
    with pytest.raises(err) as e:
        zoo[split].record(0)
    assert e.value.file
    with pytest.raises(err):
        LoraDataset(zoo[split], view="factors")[0]
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


# ---- symlinks (a local folder is the one source that can hold them) ---------------------------
def test_pull_of_a_local_folder_never_copies_a_symlink_to_a_secret(good, tmp_path):
    from lora_zoo.remote.pull import download_zoo
    from lora_zoo.remote.sources import parse_source, resolve_fsspec

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
