"""ingest end to end on a messy folder: real PEFT adapters, a cross-format duplicate, the whole
broken corpus, escaping symlinks, and a hand-made metadata table with a bad cell."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lora_zoo.cli import main
from lora_zoo.contrib.formats import read_adapter, write_adapter
from lora_zoo.contrib.ingest import ingest
from lora_zoo.errors import PathEscapeError, ShapeMismatchError
from lora_zoo.load.source import load_zoo
from tests.fixtures.adapters import gpt2_peft, llama_peft
from tests.fixtures.broken import make_corpus
from tests.fixtures.models import tiny_llama


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    root = tmp_path_factory.mktemp("pile")
    src = root / "src"
    llama_peft(src / "peft_a", seed=0)
    llama_peft(src / "sub" / "peft_b", seed=1)
    shutil.copytree(src / "peft_a", src / "copy_of_a")  # byte duplicate
    write_adapter(read_adapter(src / "peft_a"), src / "a_as_kohya.safetensors", "kohya")
    corpus = make_corpus(src / "broken")
    outside = root / "outside"
    llama_peft(outside / "secret", seed=5)
    os.symlink(outside / "secret" / "adapter_model.safetensors", src / "escape.safetensors")
    os.symlink(outside, src / "escape_dir")
    (root / "meta.csv").write_text(
        "file,score,task,acc\n"
        "peft_a,1.5,qa,0.9\n"
        "sub/peft_b,abc,summarize,0.7\n"
        "ghost,2,qa,0.1\n"
        "broken/nan,3,qa,0.2\n"
    )
    return root, src, corpus


@pytest.fixture(scope="module")
def result(pile):
    root, src, _ = pile
    rep = ingest(
        [str(src)], root / "zoo", metadata=root / "meta.csv", labels=["acc"], collection="mine",
        max_file_mb=0.2,
    )  # fmt: skip
    return rep, load_zoo(root / "zoo")


def test_accepts_good_and_skips_duplicates(result, pile):
    rep, zoo = result
    _, src, _ = pile
    assert sorted(zoo["train"].ids) == ["peft_a", "sub/peft_b"]
    dups = {
        os.path.basename(d["file"]): os.path.basename(d["duplicate_of"]) for d in rep["duplicates"]
    }
    # the byte copy and the kohya conversion of peft_a are the same LoRA
    assert set(dups) == {"copy_of_a", "a_as_kohya.safetensors"} and set(dups.values()) == {"peft_a"}
    orig = read_adapter(src / "sub" / "peft_b")
    got = zoo["train"].record("sub/peft_b")
    for k, v in orig.delta_weights().items():
        torch.testing.assert_close(got.delta_weights()[k], v)
    row = zoo["train"].row("peft_a")
    assert row["collection"] == "mine" and row["source_format"] == "peft"


def test_every_broken_file_rejected_with_its_error(result, pile):
    rep, _ = result
    _, src, corpus = pile
    by_file = {r["file"]: r for r in rep["rejected"]}
    for path, (cls, _key) in corpus.items():
        r = by_file.get(str(path))
        assert r is not None, f"{path.name} not rejected"
        assert r["error"] == cls.__name__, f"{path.name}: {r}"
    assert by_file[str(src / "escape.safetensors")]["error"] == PathEscapeError.__name__
    assert by_file[str(src / "escape_dir")]["error"] == PathEscapeError.__name__
    assert rep["counts"]["accepted"] == 2


def test_metadata_table_checked_and_reported(result):
    rep, zoo = result
    md = rep["metadata"]
    assert md["column_types"] == {"score": "float", "task": "string", "acc": "float"}
    assert md["extra_rows"] == ["broken/nan", "ghost"]
    assert md["missing_rows"] == []
    assert md["type_errors"] == [
        {"row": 1, "column": "score", "value": "'abc'", "expected": "float"}
    ]
    sp = zoo["train"]
    assert "acc" in sp.label_columns and "score" in sp.metadata_columns
    assert sp.row("peft_a")["score"] == 1.5 and sp.row("sub/peft_b")["score"] is None
    saved = json.loads(open(os.path.join(zoo.root, "ingest_report.json")).read())
    assert saved["counts"] == rep["counts"]


def test_base_model_shapes_checked(tmp_path):
    src = tmp_path / "src"
    llama_peft(src / "llama", seed=0)
    gpt2_peft(src / "gpt2", seed=0)
    base = tmp_path / "base"
    tiny_llama().config.save_pretrained(base)
    rep = ingest([str(src)], tmp_path / "zoo", base_model=str(base))
    assert [a["lora_id"] for a in rep["accepted"]] == ["llama"]
    (rej,) = rep["rejected"]
    assert rej["error"] == ShapeMismatchError.__name__ and "base model" in rej["message"]
    # a differently-sized llama: same module names, wrong shapes
    tiny_llama(hidden=32).config.save_pretrained(tmp_path / "small")
    rep = ingest([str(src / "llama")], tmp_path / "zoo2", base_model=str(tmp_path / "small"))
    assert rep["rejected"][0]["error"] == ShapeMismatchError.__name__
    assert "shape" in rep["rejected"][0]["message"]


def test_cli_ingest_glob_and_pickle_flag(tmp_path, capsys):
    src = tmp_path / "src"
    llama_peft(src / "a", seed=0)
    rec = read_adapter(src / "a")
    (src / "p").mkdir()
    torch.save(rec.to_peft_state_dict(), src / "p" / "adapter_model.bin")
    (src / "p" / "adapter_config.json").write_text(json.dumps(rec.config))
    assert main(["ingest", str(src / "*"), "--out", str(tmp_path / "z1")]) == 0
    out = capsys.readouterr().out
    assert "1 accepted, 1 rejected" in out and "PickleRefusedError" in out
    # with the flag the pickle converts, and is then a duplicate of "a"
    assert (
        main(["ingest", str(src / "*"), "--out", str(tmp_path / "z2"), "--allow-pickle-conversion"])
        == 0
    )
    out = capsys.readouterr().out
    assert "1 accepted, 0 rejected, 1 duplicates" in out


def test_three_tools_line_up_on_an_sd_base(tmp_path):
    """PEFT-on-UNet, diffusers save_lora_weights and kohya files of the same pipeline get the
    same canonical module names, and are checked against the pipeline's configs."""
    from safetensors.torch import save_file

    from tests.fixtures.adapters import (
        diffusers_lora,
        kohya_file,
        kohya_state,
        tiny_pipe,
        unet_peft,
    )

    pipe = tiny_pipe(0)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    pipe.unet.save_config(base / "unet")
    pipe.text_encoder.config.save_pretrained(base / "text_encoder")
    src = tmp_path / "src"
    unet_peft(src / "peft_unet")
    diffusers_lora(src / "dl")
    kohya_file(src / "k.safetensors")
    bad = kohya_state(seed=3)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    bad[f"{k}.lora_up.weight"] = torch.randn(32, 4)  # the mid block is 64 wide
    save_file(bad, str(src / "k_wrong.safetensors"))
    rep = ingest([str(src)], tmp_path / "zoo", base_model=str(base), collection="sd")
    assert sorted(a["format"] for a in rep["accepted"]) == ["diffusers", "kohya", "peft"]
    (rej,) = rep["rejected"]
    assert (
        rej["error"] == "ShapeMismatchError"
        and rej["key"] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    )
    sp = load_zoo(tmp_path / "zoo")["train"]
    names = [set(sp.record(i).modules) for i in sp.ids]
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert all(q in n for n in names)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert sum(te in n for n in names) == 2  # diffusers and kohya both adapt the text encoder
