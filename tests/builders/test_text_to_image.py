"""Text-to-image builder: data path, pipeline, batched generation, CLIP scoring, end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from lora_zoo.builders.text_to_image import Config, TextToImageBuilder
from lora_zoo.builders.text_to_image.data import (
    AttributeTable,
    FolderSource,
    aggregate_attributes,
    build_index,
    materialize_sample_images,
    preprocess,
    read_attribute_table,
)
from lora_zoo.builders.text_to_image.eval import (
    ClipScorer,
    TinyClip,
    _as_tensor,
    generate_grouped,
)
from lora_zoo.builders.text_to_image.pipeline import (
    TinyPipeline,
    load_pipeline,
    make_sampler,
    write_tiny_tokenizer,
)
from lora_zoo.errors import BuildError, DataSourceError
from tests.fixtures.t2i import (
    SMOKE_GROUPS,
    TINY_CLIP,
    TINY_PIPE,
    job,
    t2i_config,
    write_attribute_csv,
)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    return materialize_sample_images(tmp_path_factory.mktemp("samples"), SMOKE_GROUPS)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(TinyPipeline(**TINY_PIPE), cache_dir=str(tmp_path_factory.mktemp("c")))


# ---- config ----------------------------------------------------------------------------------
def test_config_forbids_unknown_keys_and_kinds(sample_root):
    Config.model_validate(t2i_config(sample_root))
    with pytest.raises(ValidationError, match="lerning_rate"):
        Config.model_validate(t2i_config(sample_root, train={"lerning_rate": 1.0}))
    bad = t2i_config(sample_root)
    bad["data"] = {"kind": "s3", "root": "x"}
    with pytest.raises(ValidationError, match="kind"):
        Config.model_validate(bad)
    hub = t2i_config(sample_root)
    hub["base_model"] = {"kind": "hub", "id": "CompVis/stable-diffusion-v1-4", "revision": "main"}
    assert Config.model_validate(hub).base_model.id == "CompVis/stable-diffusion-v1-4"


def test_unknown_hparam_and_missing_seed_are_named(sample_root, tmp_path):
    b = TextToImageBuilder(Config.model_validate(t2i_config(sample_root)), cache_dir=str(tmp_path))
    with pytest.raises(BuildError, match="lora-000.hparams.learning_rate"):
        b.train([job(0, ["animal"], learning_rate=1e-3)])
    j = job(0, ["animal"])
    j = type(j)(index=0, lora_id="x", seeds={"init": 1, "data": 2}, hparams={}, data=dict(j.data))
    with pytest.raises(BuildError, match=r"x.seeds.noise"):
        b.train([j])


# ---- tokenizer / data --------------------------------------------------------------------------
def test_tiny_tokenizer_files_are_deterministic(tmp_path):
    a, b = write_tiny_tokenizer(tmp_path / "a"), write_tiny_tokenizer(tmp_path / "b")
    for f in ("vocab.json", "merges.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    vocab = json.loads((a / "vocab.json").read_text())
    assert len(set(vocab.values())) == len(vocab) == max(vocab.values()) + 1


def test_sample_images_are_deterministic_and_grouped(sample_root, tmp_path):
    other = materialize_sample_images(tmp_path / "again", ["animal"])
    for f in sorted((other / "animal").iterdir()):
        assert f.read_bytes() == (sample_root / "animal" / f.name).read_bytes()
    idx = build_index(FolderSource(root=str(sample_root), resolution=16))
    assert idx.groups == sorted(SMOKE_GROUPS)
    assert all(len(idx.by_group[g]) == 6 for g in SMOKE_GROUPS)
    it = idx.by_group["animal"][0]
    assert idx.sha256(it) == hashlib.sha256((sample_root / it.image_id).read_bytes()).hexdigest()


def test_preprocess_is_resize_center_crop_normalise():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # H=30, W=50
    img = Image.fromarray(arr)
    out = preprocess(img, 12)
    # reference: shorter side 30 -> 12 gives (12, 20); crop columns 4..16
    ref = np.asarray(img.resize((20, 12), Image.BILINEAR), dtype=np.float32)[:, 4:16]
    assert out.shape == (3, 12, 12)
    torch.testing.assert_close(out, torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1)
    assert out.min() >= -1 and out.max() <= 1


def test_bad_sources_raise_named_errors(tmp_path, sample_root):
    (tmp_path / "empty" / "g").mkdir(parents=True)
    with pytest.raises(DataSourceError, match="no images found") as e:
        build_index(FolderSource(root=str(tmp_path / "empty")))
    assert e.value.file == str(tmp_path / "empty")
    with pytest.raises(DataSourceError, match="does not exist"):
        build_index(FolderSource(root=str(tmp_path / "nope")))
    idx = build_index(FolderSource(root=str(sample_root)))
    with pytest.raises(DataSourceError, match="'zebra' not in the data source") as e:
        idx.select(["zebra"], size=None, seed=0)
    assert e.value.key == "data.groups_included"
    (tmp_path / "broken" / "g").mkdir(parents=True)
    (tmp_path / "broken" / "g" / "x.png").write_bytes(b"not a png")
    bidx = build_index(FolderSource(root=str(tmp_path / "broken")))
    with pytest.raises(DataSourceError, match="cannot decode image") as e:
        bidx.load(bidx.items[0], 8)
    assert e.value.key == "g/x.png"


def test_select_draws_seeded_subsets(sample_root):
    idx = build_index(FolderSource(root=str(sample_root)))
    a = idx.select(["animal", "object"], size=4, seed=7)
    assert a == idx.select(["animal", "object"], size=4, seed=7)
    assert len(a) == 4 and {it.group for it in a} <= {"animal", "object"}
    assert len(idx.select(["animal"], size=None, seed=0)) == 6


def test_attribute_table_majority_vote(tmp_path):
    ids = ["a/1.png", "a/2.png", "a/3.png", "b/1.png"]
    path = write_attribute_csv(
        tmp_path / "attr.csv",
        ids,
        ["Male", "Young"],
        {"Male": [1, 1, -1, -1], "Young": [-1, 1, -1, 1]},
    )
    table = read_attribute_table(AttributeTable(path=str(path), columns=["Male", "Young"]))
    labels, frac = aggregate_attributes(table, ids[:3], ["Male", "Young"])
    assert labels == {"Male": True, "Young": False}
    assert frac == pytest.approx({"Male": 2 / 3, "Young": 1 / 3})
    # tie -> False
    assert aggregate_attributes(table, ["a/1.png", "b/1.png"], ["Male"])[0] == {"Male": False}
    with pytest.raises(DataSourceError, match="not in the attribute table") as e:
        aggregate_attributes(table, ["zz.png"], ["Male"], file=str(path))
    assert e.value.key == "zz.png" and e.value.file == str(path)
    with pytest.raises(DataSourceError, match="missing") as e:
        read_attribute_table(AttributeTable(path=str(path), columns=["Bald"]))
    assert e.value.key == "Bald"


def test_celeba_txt_format(tmp_path):
    p = tmp_path / "list_attr_celeba.txt"
    p.write_text("2\nMale Young\n000001.jpg  1 -1\n000002.jpg -1 -1\n")
    t = read_attribute_table(AttributeTable(path=str(p), columns=["Male", "Young"]))
    assert t == {
        "000001.jpg": {"Male": 1.0, "Young": -1.0},
        "000002.jpg": {"Male": -1.0, "Young": -1.0},
    }
    # folder ids "<identity>/<file>" fall back to the basename
    assert aggregate_attributes(t, ["7/000001.jpg"], ["Male"])[0] == {"Male": True}


# ---- generation / CLIP ---------------------------------------------------------------------------
def test_grouped_generation_matches_stock_pipeline(pipe):
    """K=1 grouped loop == StableDiffusionPipeline.__call__ with the same initial latents."""
    from diffusers import StableDiffusionPipeline

    prompts = ["a photo of sks", "a cat"]
    ours = generate_grouped(
        pipe,
        [prompts],
        sampler=make_sampler(pipe, "ddim"),
        steps=4,
        guidance=5.0,
        seed=42,
        resolution=16,
    )[0]
    g = torch.Generator().manual_seed(42)
    lat = torch.randn((2, 4, 8, 8), generator=g)
    stock = StableDiffusionPipeline(**{**pipe.components, "scheduler": make_sampler(pipe, "ddim")})
    stock.set_progress_bar_config(disable=True)
    ref = stock(
        prompts,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=lat,
        height=16,
        width=16,
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_grouped_generation_is_per_lora_independent(pipe):
    """K LoRAs in one loop give each LoRA what it gets alone (engine wrappers, nonzero B)."""
    import copy

    from lora_zoo.engine import LoraSpec, MultiLoraModel

    unet = copy.deepcopy(pipe.unet)
    p2 = type(pipe)(**{**pipe.components, "unet": unet})
    specs = [LoraSpec(r=4, alpha=8, init_seed=s) for s in (1, 2, 3)]
    mm = MultiLoraModel(unet, ["to_q", "to_v"], specs)
    torch.manual_seed(0)
    for w in mm.wrappers.values():
        with torch.no_grad():
            w.lora_B.normal_(0, 0.5)
    saved = {
        n: (w.lora_A.detach().clone(), w.lora_B.detach().clone()) for n, w in mm.wrappers.items()
    }
    mm.eval()
    prompts = [["a photo of sks", "x"], ["a photo of dog", "x"], ["a photo of skd", "x"]]
    kw = dict(steps=3, guidance=4.0, seed=1, resolution=16)
    together = generate_grouped(p2, prompts, sampler=make_sampler(p2, "ddim"), **kw)
    assert not torch.allclose(together[0], together[1])
    for k in range(3):
        mm.reset([specs[k]])
        for n, w in mm.wrappers.items():
            with torch.no_grad():
                w.lora_A.copy_(saved[n][0][k : k + 1])
                w.lora_B.copy_(saved[n][1][k : k + 1])
        alone = generate_grouped(p2, [prompts[k]], sampler=make_sampler(p2, "ddim"), **kw)[0]
        torch.testing.assert_close(together[k], alone, atol=1e-5, rtol=1e-4)
    mm.remove()


def test_clip_score_matches_clipmodel_forward(tmp_path):
    """ClipScorer == 100 * max(logits_per_image / logit_scale, 0) from CLIPModel.forward."""
    scorer = ClipScorer(TinyClip(**TINY_CLIP), cache_dir=str(tmp_path))
    imgs = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    texts = ["a photo of sks", "a cat", "skd person"]
    got = scorer.score(imgs, texts)
    arrs = [np.asarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8)) for im in imgs]
    inp = scorer.processor(text=texts, images=arrs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inp)
    cos = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    torch.testing.assert_close(got, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert (got > 0).any()


class _Tensors(torch.nn.Module):
    """torchmetrics 1.9 divides get_*_features' result by its norm; transformers 5 returns a
    model output there (its pooled projection is the tensor torchmetrics means), so this hands
    torchmetrics the tensor and leaves processing, normalising, the mean and the clamp to it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *a, **k):
        return _as_tensor(self.model.get_image_features(*a, **k))

    def get_text_features(self, *a, **k):
        return _as_tensor(self.model.get_text_features(*a, **k))


def test_clip_score_equals_torchmetrics(tmp_path):
    """Per pair and per LoRA (a set of pairs), our CLIP score is torchmetrics' ``clip_score`` on
    the same uint8 images, captions, CLIP model and processor (fails on the old per-LoRA mean of
    clamped scores: the seed-0 images below include negative cosines)."""
    from torchmetrics.functional.multimodal import clip_score

    spec = TinyClip(**TINY_CLIP)
    scorer = ClipScorer(spec, cache_dir=str(tmp_path))
    imgs = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    texts = ["a photo of sks", "a cat", "skd person", "a sks on a table", "x", "a photo of skd"]
    u8 = (imgs * 255).round().to(torch.uint8)  # what ours scores (saved-PNG quantisation)
    pair = lambda: (_Tensors(scorer.model), scorer.processor)  # noqa: E731
    sim = scorer.similarity(imgs, texts)
    assert (sim < 0).any() and (sim > 0).any()  # the clamp order matters on these inputs
    # float32 features of width projection_dim (d): the cosine's rounding is ~d * eps32 in each
    # implementation; x100 for the score scale, x10 headroom for the two reduction orders
    tol = 10 * 100 * spec.projection_dim * torch.finfo(torch.float32).eps
    ref = torch.stack([clip_score(u8[i], texts[i], pair) for i in range(len(texts))])
    torch.testing.assert_close(scorer.score(imgs, texts), ref, atol=tol, rtol=0)
    ref_set = clip_score(list(u8), texts, pair)
    torch.testing.assert_close(ClipScorer.set_score(sim), ref_set, atol=tol, rtol=0)
    assert float(ref_set) < float(scorer.score(imgs, texts).mean()) - 1.0  # the old rule differs


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_builder_end_to_end_records_labels_and_peft_loadable(sample_root, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from lora_zoo.record import LoraRecord

    ids = sorted(f"{g}/{f.name}" for g in SMOKE_GROUPS for f in (sample_root / g).iterdir())
    vals = {"Striped": [1 if i % 3 == 0 else -1 for i in range(len(ids))]}
    attr = write_attribute_csv(tmp_path / "attr.csv", ids, ["Striped"], vals)
    cfg = Config.model_validate(
        t2i_config(sample_root, data={"attributes": {"path": str(attr), "columns": ["Striped"]}})
    )
    b = TextToImageBuilder(cfg, cache_dir=str(tmp_path))
    jobs = [
        job(0, ["animal"], lr=1e-3, prompt="skd"),
        job(1, ["object", "scene"], steps=2, grad_accum=2, num_images=5),
        job(2, ["people"], r=2),
    ]
    res = b.train(jobs)
    assert [r.status for r in res] == ["done"] * 3
    m0, m1 = res[0].metadata, res[1].metadata
    assert m0["prompt"] == "skd" and m0["groups_included"] == ["animal"]
    assert m0["train_example_ids"] == [
        f"animal/{f}" for f in sorted(p.name for p in (sample_root / "animal").iterdir())
    ]
    assert len(m1["train_example_ids"]) == 5 and len(m1["train_example_sha256"]) == 5
    assert {i.split("/")[0] for i in m1["train_example_ids"]} <= {"object", "scene"}
    assert (
        m0["train_example_sha256"][0]
        == hashlib.sha256((sample_root / m0["train_example_ids"][0]).read_bytes()).hexdigest()
    )
    assert m1["steps_done"] == 2 and m1["hp"]["grad_accum"] == 2
    assert "seeds" not in m0  # seeds are the job's; pack stores them once, as seed.*
    # labels: membership bits over sorted groups, majority attribute, CLIP per prompt
    assert res[1].scores["membership"] == [0, 1, 0, 1]
    pos = [vals["Striped"][ids.index(i)] > 0 for i in m0["train_example_ids"]]
    assert res[0].scores["attributes"]["Striped"] == (sum(pos) / len(pos) > 0.5)
    assert res[0].scores["attribute_fraction"]["Striped"] == pytest.approx(sum(pos) / len(pos))
    assert len(res[0].scores["clip_score_per_prompt"]) == 2
    # torchmetrics' set score clamps the mean of the raw cosines, so it is <= the mean of the
    # per-prompt clamped scores (equal when no cosine is negative)
    assert (
        0 <= res[0].scores["clip_score"] <= np.mean(res[0].scores["clip_score_per_prompt"]) + 1e-4
    )
    assert (
        m0["clip_eval"]["clip_model"] == "tiny-clip-config-seed3" and m0["clip_eval"]["seed"] == 42
    )
    # records: PEFT names inside the UNet, r from hparams, zoo bytes load into a PEFT UNet and give
    # the same noise prediction as the batched engine
    rec = LoraRecord.from_safetensors_bytes(res[2].record.to_safetensors_bytes())
    assert set(rec.ranks.values()) == {2}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in rec.modules
    assert any(m.B.abs().sum() > 0 for m in rec.modules.values())
    fresh = load_pipeline(TinyPipeline(**TINY_PIPE), cache_dir=str(tmp_path))
    peft_unet = get_peft_model(
        fresh.unet,
        LoraConfig(
            **{
                k: v
                for k, v in rec.config.items()
                if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora")
            }
        ),
    )
    set_peft_model_state_dict(peft_unet, rec.to_peft_state_dict())
    x = torch.randn(1, 4, 8, 8)
    e = torch.randn(1, 16, 32)
    with torch.no_grad():
        ref = peft_unet(x, 10, encoder_hidden_states=e).sample
        ours = b.pipe.unet(x.repeat(3, 1, 1, 1), 10, encoder_hidden_states=e.repeat(3, 1, 1)).sample
    torch.testing.assert_close(ours[2:3], ref, atol=1e-5, rtol=1e-4)
    # group-aware split on the recorded membership: no group in two splits
    from lora_zoo.zoo.splits import group_split

    split = group_split(
        [r.job.lora_id for r in res],
        [r.metadata["groups_included"] for r in res],
        {"train": 0.5, "test": 0.5},
        lists="components",
    )
    seen = {
        s: {g for r in res if r.job.lora_id in ids_ for g in r.metadata["groups_included"]}
        for s, ids_ in split.items()
    }
    assert not (seen["train"] & seen["test"]) and sum(map(len, split.values())) == 3
    # metadata / labels are Arrow-friendly: a zoo round trip keeps them
    from lora_zoo.load.source import load_zoo
    from lora_zoo.zoo.writer import ZooWriter

    w = ZooWriter(tmp_path / "zoo")
    for r in res:
        w.add(
            r.record,
            lora_id=r.job.lora_id,
            metadata=r.metadata,
            labels=r.scores,
            base_model="tiny-sd-config",
        )
    w.close()
    row = load_zoo(tmp_path / "zoo")["train"].row("lora-001")
    assert row["train_example_ids"] == m1["train_example_ids"]
    assert row["membership"] == [0, 1, 0, 1]
    assert row["attributes.Striped"] == res[1].scores["attributes"]["Striped"]
    assert row["clip_eval.prompts"] == ["a photo of {prompt}", "a {prompt} on a table"]
    assert row["hp.grad_accum"] == 2  # the resolved value, stored once (format 2)
    assert not [c for c in row if c.startswith(("hparams.", "seeds."))]
    # the same jobs again (resident pipeline, latent cache warm) give bit-identical weights
    # (same batch composition: a different K changes the float summation order, not the math)
    again = b.train(jobs)
    for got, ref in zip(again, res, strict=True):
        for name, mod in got.record.modules.items():
            assert torch.equal(mod.A, ref.record.modules[name].A)
            assert torch.equal(mod.B, ref.record.modules[name].B)


def test_failed_lora_is_isolated(sample_root, tmp_path):
    cfg = Config.model_validate(
        t2i_config(sample_root, eval={"enabled": False}, train={"steps": 2, "max_grad_norm": 1e30})
    )
    b = TextToImageBuilder(cfg, cache_dir=str(tmp_path))
    res = b.train([job(0, ["animal"]), job(1, ["animal"], lr=1e38)])
    assert res[0].status == "done" and res[0].record is not None
    assert res[1].status == "failed" and res[1].record is None and res[1].failed_step is not None


def test_hub_dataset_path_with_local_parquet_repo(sample_root, tmp_path):
    """The real ``datasets.load_dataset`` path, on a local parquet dataset dir (no network):
    group column, row ids, undecoded bytes hashed as published, attributes from the rows."""
    import datasets

    from lora_zoo.builders.text_to_image.data import HubImageSource

    paths = sorted(str(p) for g in ("animal", "object") for p in (sample_root / g).iterdir())
    ds = datasets.Dataset.from_dict(
        {
            "image": paths,
            "celeb_id": [i // 4 for i in range(len(paths))],
            "Male": [i % 3 == 0 for i in range(len(paths))],
        }
    ).cast_column("image", datasets.Image())
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    spec = HubImageSource(
        path=str(tmp_path / "repo"),
        group_column="celeb_id",
        resolution=16,
        attributes=AttributeTable(columns=["Male"]),
    )
    idx = build_index(spec)
    assert idx.groups == ["0", "1", "2"]
    it = idx.by_id["train/5"]
    assert it.group == "1"
    assert idx.sha256(it) == hashlib.sha256(open(paths[5], "rb").read()).hexdigest()
    assert idx.load(it, 16).shape == (3, 16, 16)
    table = read_attribute_table(spec.attributes, idx)
    assert table["train/3"] == {"Male": 1.0} and table["train/4"] == {"Male": 0.0}
    with pytest.raises(DataSourceError, match="column 'person' not in dataset") as e:
        build_index(HubImageSource(path=str(tmp_path / "repo"), group_column="person"))
    assert e.value.key == "person"


@pytest.mark.parametrize(
    "name", ["celeba-sd14-r4", "imagenette-sd14-r32", "imagenette-sd15-r32", "t2i-smoke"]
)
def test_shipped_recipes_validate_against_config(name):
    import importlib.resources

    import yaml

    from lora_zoo.build.api import BUILDER_SECTIONS

    text = (importlib.resources.files("lora_zoo.recipes") / f"{name}.yaml").read_text()
    assert text.startswith("#") and "lora-zoo build recipes/" in text
    d = yaml.safe_load(text)
    assert d["builder"] == "text_to_image"
    cfg = Config.model_validate({k: d[k] for k in BUILDER_SECTIONS if k in d})
    if name.startswith("celeba"):
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (4, 27, ["to_q", "to_v"])
        assert cfg.data.attributes.columns == [
            "Male",
            "Young",
            "Wearing_Lipstick",
            "Big_Lips",
            "No_Beard",
        ]
        assert cfg.eval.clip.id == "openai/clip-vit-base-patch16" and cfg.eval.steps == 20
        assert d["output"]["split"] == {
            "kind": "group",
            "key": "groups_included",
            "fractions": {"train": 0.8, "test": 0.2},
            "seed": 0,
        }


def test_imagenette_twins_share_the_plan():
    import importlib.resources

    import yaml

    r = importlib.resources.files("lora_zoo.recipes")
    a = yaml.safe_load((r / "imagenette-sd14-r32.yaml").read_text())
    b = yaml.safe_load((r / "imagenette-sd15-r32.yaml").read_text())
    diff = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert diff == {"name", "base_model"}
    assert a["base_model"]["id"] != b["base_model"]["id"]
