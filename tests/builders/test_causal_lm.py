"""The causal-LM builder: ARC parsing, batched evaluation against a slow one-LoRA-at-a-time
PEFT scorer, and full builds through ``lora_zoo.build.runner.build`` on a tiny from-config model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lora_zoo.builders.causal_lm.data import ByteTokenizer, Example, arc_example, arc_source
from lora_zoo.builders.causal_lm.eval import build_eval_rows, score_rows, summarise
from lora_zoo.engine import LoraSpec, MultiLoraModel
from lora_zoo.errors import DataSourceError
from tests.fixtures.models import tiny_llama

FIXTURE = Path(__file__).parents[1] / "fixtures" / "arc_sample.jsonl"
TINY_BASE = (
    "base_model={kind: config, architecture: llama, seed: 0, pretrain_steps: 0, config: "
    "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 160}}"
)


# ---- ARC parsing ----------------------------------------------------------------------------------
def test_arc_source_and_example_follow_lm_eval_format():
    assert arc_source("Mercury_SC_401169") == "Mercury"
    assert arc_source("NYSEDREGENTS_2006_8_10") == "NYSEDREGENTS"
    assert arc_source("AKDE&ED_2008_4_3") == "AKDE&ED"
    assert arc_source("LEAP__5_10314") == "LEAP"
    row = {
        "id": "MCAS_2004_5_1",
        "question": "What melts ice?",
        "choices": {"text": ["heat", "cold"], "label": ["1", "2"]},
        "answerKey": "1",
    }
    ex = arc_example(row)
    assert ex.group == "MCAS"
    assert ex.context == "Question: What melts ice?\nAnswer:"
    assert ex.choices == (" heat", " cold") and ex.label == 0


@pytest.mark.parametrize(
    "row,key",
    [
        ({"id": "X_1", "question": "q", "choices": {"text": ["a"], "label": ["A"]}}, "answerKey"),
        ({"id": "X_1", "question": "q", "choices": ["a"], "answerKey": "A"}, "X_1.choices"),
        (
            {
                "id": "X_1",
                "question": "q",
                "choices": {"text": ["a"], "label": ["A"]},
                "answerKey": "B",
            },
            "X_1.answerKey",
        ),
    ],
)
def test_bad_arc_rows_name_file_and_field(row, key):
    with pytest.raises(DataSourceError) as e:
        arc_example(row, file="arc.jsonl")
    assert e.value.file == "arc.jsonl" and e.value.key == key
    assert str(e.value).startswith("arc.jsonl: " + key)


# ---- batched eval vs a slow obvious scorer -------------------------------------------------------
def _slow_choice_logprobs(model: torch.nn.Module, tok: ByteTokenizer, ex: Example) -> list[float]:
    """One example, one choice, one unpadded forward at a time: sum of log P(choice tokens)."""
    out = []
    ctx = [tok.bos_id, *tok.encode(ex.context)]
    for ch in ex.choices:
        ids = torch.tensor([ctx + tok.encode(ch)])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(float(lp[t - 1, ids[0, t]]) for t in range(len(ctx), ids.shape[1])))
    return out


@pytest.mark.slow
def test_batched_eval_of_k_loras_matches_separate_peft_scoring(tmp_path):
    tok = ByteTokenizer()
    examples = [arc_example(json.loads(line)) for line in FIXTURE.read_text().splitlines()][:9]
    base = tiny_llama(vocab=tok.vocab_size, hidden=32)
    model = tiny_llama(vocab=tok.vocab_size, hidden=32)
    specs = [LoraSpec(r=r, alpha=8, init_seed=s) for r, s in ((2, 1), (4, 2), (3, 3))]
    mm = MultiLoraModel(model, ["q_proj", "v_proj"], specs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so every LoRA changes the scores differently
        for w in mm.wrappers.values():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.5 * w.rank_mask[:, None])
    mm.eval()

    def tokenize(ex: Example):
        ctx = [tok.bos_id, *tok.encode(ex.context)]
        return ctx, [tok.encode(c) for c in ex.choices]

    rows = build_eval_rows(examples, tokenize, max_len=512, multiple_choice=True)
    scores = score_rows(
        model, rows, 3, batch_size=16, pad_id=tok.pad_id, device=torch.device("cpu")
    )
    fast = summarise(examples, rows, scores, loss_on="continuation", per_group=True)
    records = mm.extract([f"l{k}" for k in range(3)])
    accs = set()
    for k, rec in enumerate(records):
        folder = tmp_path / f"l{k}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(rec.to_safetensors_bytes())
        (folder / "adapter_config.json").write_text(json.dumps(rec.config))
        pm = PeftModel.from_pretrained(base, str(folder)).eval()
        hits, hits_norm, nll, ntok, slow = [], [], 0.0, 0, []
        for ex in examples:
            lps = _slow_choice_logprobs(pm, tok, ex)
            slow.append(lps)
            hits.append(max(range(len(lps)), key=lps.__getitem__) == ex.label)
            # lm-evaluation-harness (api/task.py): lls / len(choice), the choice as doc_to_choice
            # gives it, i.e. without the " " target_delimiter it prepends for scoring
            norm = [lp / len(c.removeprefix(" ")) for lp, c in zip(lps, ex.choices)]
            hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == ex.label)
            nll -= lps[ex.label]
            ntok += len(tok.encode(ex.choices[ex.label]))
        for i, r in enumerate(rows):
            assert abs(float(scores[0][k, i]) - slow[r.example][r.choice]) < 1e-3
        assert fast[k]["acc"] == pytest.approx(sum(hits) / len(hits))
        assert fast[k]["acc_norm"] == pytest.approx(sum(hits_norm) / len(hits_norm))
        assert fast[k]["eval_loss"] == pytest.approx(nll / ntok, rel=1e-5)
        assert set(fast[k]["eval_loss_by_group"]) == {e.group for e in examples}
        accs.add(round(fast[k]["eval_loss"], 6))
        base = pm.unload()
    assert len(accs) == 3  # the three LoRAs really score differently


# ---- full builds through the runner ----------------------------------------------------------
def _arc_overrides(n: int, k: int) -> list[str]:
    data = f"{{kind: files, paths: [{FIXTURE}], task: arc}}"
    return [
        TINY_BASE,
        f"data={data}",
        f"eval.data={data}",
        f"num_loras={n}",
        f"train.k={k}",
        "vary.epochs={kind: choice, values: [1, 2]}",
        "vary.batch_size={kind: choice, values: [4, 8]}",
        "vary.lr={kind: loguniform, low: 1.0e-3, high: 1.0e-2}",
        "train.micro_batch_size=4",
        "eval.batch_size=64",
        "output.split={kind: random, fractions: {train: 0.5, test: 0.5}, seed: 0}",
    ]


def test_arc_recipe_builds_end_to_end_on_local_file(tmp_path):
    from lora_zoo import load_zoo
    from lora_zoo.build.runner import build

    res = build(
        "recipes/arc-qwen2-r4.yaml",
        tmp_path / "zoo",
        overrides=_arc_overrides(4, 2),
        progress=False,
    )
    assert res.counts == {"done": 4, "failed": 0, "pending": 0}
    zoo = load_zoo(tmp_path / "zoo")
    rows = [r for s in zoo.splits for r in (zoo[s].row(i) for i in range(len(zoo[s])))]
    assert len(rows) == 4
    fixture = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    sources = sorted({arc_source(r["id"]) for r in fixture})
    split = zoo[zoo.splits[0]]
    for col in ("eval_loss", "acc", "acc_norm", *(f"in_group.{s}" for s in sources)):
        assert col in split.label_columns, col
    for col in (
        "train_example_ids",
        "groups_included",
        "final_train_loss",
        "hp.lr",
        "hp.steps",
        "seed.init",
        "seed.data",
    ):
        assert col in split.metadata_columns, col
    group_of = {r["id"]: arc_source(r["id"]) for r in fixture}
    for r in rows:
        inc = set(r["groups_included"])
        assert inc and set(r["groups_excluded"]) and inc.isdisjoint(r["groups_excluded"])
        assert 1 <= len(r["groups_excluded"]) <= 6
        assert {group_of[i] for i in r["train_example_ids"]} <= inc
        # every example of the included groups is used (no subset size in the recipe)
        assert len(r["train_example_ids"]) == sum(g in inc for g in group_of.values())
        assert all(r[f"in_group.{s}"] == (s in inc) for s in sources)
        assert 0.0 <= r["acc"] <= 1.0 and r["eval_loss"] > 0
        assert any(c.startswith("eval_loss_by_group.") and r[c] > 0 for c in r)
        assert r["hp.r"] == 4 and r["final_train_loss"] > 0  # a resolved default, under hp.*
    # format 2: hyperparameters and seeds are stored once, under one prefix each
    assert not [c for c in split.metadata_columns if c.startswith(("train_hparams.", "seeds."))]
    lrs = {r["hp.lr"] for r in rows}
    assert len(lrs) == 4
    rec = split.record(0)
    assert rec.config["r"] == 4 and sorted(rec.config["target_modules"]) == ["q_proj", "v_proj"]
    assert all(name.endswith(("q_proj", "v_proj")) for name in rec.modules)


def test_k1_and_k4_builds_give_the_same_loras(tmp_path):
    """K is a throughput knob only: no dropout and equal batch sizes, so each LoRA's data and
    masks are the same whatever K, and the K=1 and K=4 zoos agree to float tolerance."""
    from lora_zoo import load_zoo
    from lora_zoo.build.runner import build

    over = [
        TINY_BASE.replace("pretrain_steps: 0", "pretrain_steps: 20"),
        "num_loras=4",
        "vary={lr: {kind: loguniform, low: 1.0e-3, high: 1.0e-2}}",
        "lora.dropout=0.0",
        "lora.target_modules=[q_proj, v_proj]",
        "train.steps=6",
        "train.batch_size=4",
        "data.n_examples=120",
        "eval.max_examples=12",
        "output.split={kind: none}",
    ]
    zoos = {}
    for k in (1, 4):
        build(
            "recipes/quickstart.yaml",
            tmp_path / f"k{k}",
            overrides=[*over, f"train.k={k}"],
            progress=False,
        )
        zoos[k] = load_zoo(tmp_path / f"k{k}")
    s1, s4 = (zoos[k][zoos[k].splits[0]] for k in (1, 4))
    assert s1.ids == s4.ids and len(s1) == 4
    for i in range(4):
        r1, r4 = s1.record(i), s4.record(i)
        for name, m in r1.modules.items():
            torch.testing.assert_close(m.A, r4.modules[name].A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(m.B, r4.modules[name].B, rtol=1e-4, atol=1e-6)
            assert m.B.abs().max() > 0
        row1, row4 = s1.row(i), s4.row(i)
        assert row1["train_example_ids"] == row4["train_example_ids"]
        # the K=4 build loaded the base from the cache the K=1 build wrote: per-LoRA metadata
        # must not tell the two apart (resumed and sharded builds hit the cache the same way)
        pre1 = {c: v for c, v in row1.items() if c.startswith(("pretrain", "base_"))}
        assert pre1 and pre1 == {c: row4[c] for c in pre1}
        assert "pretrain_loss_last" in pre1
        assert row1["eval_loss"] == pytest.approx(row4["eval_loss"], rel=1e-4)
        assert row1["acc"] == pytest.approx(row4["acc"])


@pytest.mark.slow
def test_bench_build_runs_without_datasets_or_diffusers(tmp_path):
    """The GPU box has neither package: block both imports and run a tiny benchmark."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['datasets'] = None; sys.modules['diffusers'] = None\n"
        "import runpy; sys.argv = ['bench_build.py', '--loras', '2', '--fresh-loras', '1',"
        " '--ks', '1,2', '--steps', '2', '--seq', '16', '--json', sys.argv[1]]\n"
        "runpy.run_path('benchmarks/bench_build.py', run_name='__main__')\n"
    )
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(c) engine K=2" in proc.stdout and "vs (b)" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["loras"] for r in rows] == [1, 2, 2, 2]
    assert all(r["loras_per_hour"] > 0 for r in rows)


def test_arc_recipe_validates_and_expands_like_the_paper():
    """The shipped recipe as is (only the data pointed at the local ARC-shaped file, since
    ``groups: from_data`` reads the sources): 2000 jobs with the paper's ranges, deterministic."""
    import math
    import statistics

    from lora_zoo.build.plan import plan
    from lora_zoo.build.recipe import load_recipe

    data = f"data={{kind: files, paths: [{FIXTURE}], task: arc}}"
    recipe = load_recipe("recipes/arc-qwen2-r4.yaml", [data])
    cfg = recipe.config
    assert recipe.model.num_loras == 2000 and recipe.k == 16
    assert cfg.base_model.kind == "hub" and cfg.base_model.id == "Qwen/Qwen2-0.5B"
    assert len(cfg.base_model.revision) == 40
    assert cfg.lora.r == 4 and sorted(cfg.lora.target_modules) == ["q_proj", "v_proj"]
    assert cfg.eval.data.name == "ARC-Challenge" and cfg.eval.data.split == "test"
    text = Path("recipes/arc-qwen2-r4.yaml").read_text()
    assert text.startswith("# The LoL paper's Qwen2 ARC zoo") and "lora-zoo build" in text
    orig = load_recipe("recipes/arc-qwen2-r4.yaml")  # unmodified: the Hub source
    assert orig.config.data.kind == "hub" and orig.config.data.path == "allenai/ai2_arc"
    assert orig.config.data.name == ["ARC-Easy", "ARC-Challenge"]

    jobs = plan(recipe)
    assert len(jobs) == 2000 and len({j.lora_id for j in jobs}) == 2000
    assert [j.to_dict() for j in jobs[:50]] == [j.to_dict() for j in plan(recipe, limit=50)]
    hp = [j.hparams for j in jobs]
    lrs = [h["lr"] for h in hp]
    assert 1e-5 <= min(lrs) and max(lrs) <= 1e-3
    assert abs(statistics.median(math.log10(x) for x in lrs) + 4) < 0.1  # log-uniform
    wds = [h["weight_decay"] for h in hp]
    assert 1e-6 <= min(wds) and max(wds) <= 1e-2
    assert abs(statistics.median(math.log10(x) for x in wds) + 4) < 0.15
    assert {h["epochs"] for h in hp} == {2, 3, 4}
    assert {h["batch_size"] for h in hp} == {32, 64, 128}
    drops = [h["dropout"] for h in hp]
    assert 0 <= min(drops) and max(drops) <= 0.1 and abs(statistics.mean(drops) - 0.05) < 0.005
    sources = {arc_source(json.loads(line)["id"]) for line in FIXTURE.read_text().splitlines()}
    for j in jobs:
        exc, inc = set(j.data["groups_excluded"]), set(j.data["groups_included"])
        assert 1 <= len(exc) <= 6 and exc | inc == sources and not exc & inc
    assert len({frozenset(j.data["groups_excluded"]) for j in jobs}) > 100
    for stream in ("init", "data", "dropout"):
        assert len({j.seeds[stream] for j in jobs}) == 2000


@pytest.mark.slow
def test_acc_and_acc_norm_equal_lm_evaluation_harness_on_the_same_questions(tmp_path):
    """The multiple-choice labels against the field's scorer: lm-evaluation-harness' own ARC
    task logic (prompt, choices, target, and its process_results turning per-choice
    loglikelihoods into acc / acc_norm), on the same questions and the same loglikelihoods."""
    lm_task = pytest.importorskip("lm_eval.api.task")
    tok = ByteTokenizer()
    lines = FIXTURE.read_text().splitlines()
    examples = [arc_example(json.loads(line)) for line in lines]
    model = tiny_llama(vocab=tok.vocab_size, hidden=32)
    specs = [LoraSpec(r=2, alpha=4, init_seed=s) for s in (1, 2)]
    mm = MultiLoraModel(model, ["q_proj", "v_proj"], specs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in mm.wrappers.values():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.5 * w.rank_mask[:, None])
    mm.eval()

    def tokenize(ex: Example):
        return [tok.bos_id, *tok.encode(ex.context)], [tok.encode(c) for c in ex.choices]

    rows = build_eval_rows(examples, tokenize, max_len=512, multiple_choice=True)
    scores = score_rows(
        model, rows, 2, batch_size=16, pad_id=tok.pad_id, device=torch.device("cpu")
    )
    ours = summarise(examples, rows, scores, loss_on="continuation", per_group=False)
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    task = lm_task.ConfigurableTask(
        config={  # lm-eval's arc_easy.yaml, on the local file
            "task": "arc_local",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "test.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    )
    docs = list(task.test_docs())
    assert len(docs) == len(examples)
    by_ex = {}
    for i, r in enumerate(rows):
        by_ex.setdefault(r.example, []).append(i)
    for k in range(2):
        acc, acc_norm = [], []
        for e, (ex, doc) in enumerate(zip(examples, docs)):
            # same question, choices (lm-eval adds its " " delimiter when scoring) and target
            assert task.doc_to_text(doc) == ex.context
            assert [task.config.target_delimiter + c for c in task.doc_to_choice(doc)] == list(
                ex.choices
            )
            assert task.doc_to_target(doc) == ex.label
            lls = [
                (float(scores[0][k, i]), False)
                for i in sorted(by_ex[e], key=lambda i: rows[i].choice)
            ]
            res = task.process_results(doc, lls)
            acc.append(res["acc"])
            acc_norm.append(res["acc_norm"])
        assert ours[k]["acc"] == pytest.approx(sum(acc) / len(acc), abs=1e-12)
        assert ours[k]["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm), abs=1e-12)


@pytest.mark.slow  # a full 4-LoRA build + pack (about 40 s on the shared 2-core box)
def test_variant_hparam_builds_each_variant(tmp_path):
    """``vary: variant`` reaches the engine and the zoo: rsLoRA's scale, DoRA's magnitudes,
    PiSSA's converted rank-2r LoRA (ΔW on the true base), and hp.* says which is which."""
    import math

    from lora_zoo import load_zoo
    from lora_zoo.build.runner import build

    over = [
        TINY_BASE,
        "num_loras=4",
        "vary={variant: {kind: cycle, values: [plain, rslora, dora, pissa]}}",
        "lora.target_modules=[q_proj, v_proj]",
        "train.k=4",
        "train.steps=3",
        "train.batch_size=4",
        "data.n_examples=60",
        "eval.max_examples=8",
        "output.split={kind: none}",
    ]
    res = build("recipes/variants-quickstart.yaml", tmp_path / "z", overrides=over, progress=False)
    assert res.counts == {"done": 4, "failed": 0, "pending": 0}
    sp = load_zoo(tmp_path / "z")["train"]
    rows = {sp.row(i)["hp.variant"]: (sp.row(i), sp.record(i)) for i in range(4)}
    assert set(rows) == {"plain", "rslora", "dora", "pissa"}
    r4 = rows["plain"][0]["hp.r"]
    for variant, (row, rec) in rows.items():
        assert row["hp.use_rslora"] == (variant == "rslora")
        assert row["hp.use_dora"] == rec.is_dora == (variant == "dora")
        assert row["hp.init"] == ("pissa" if variant == "pissa" else "default")
        m = next(iter(rec.modules.values()))
        assert m.rank == (2 * r4 if variant == "pissa" else r4) == rec.config["r"]
        want = 8 / math.sqrt(r4) if variant == "rslora" else 8 / r4  # alpha 8 in the recipe
        assert m.scale == pytest.approx(want)
    # PiSSA starts from W0's top singular pair: its stored ΔW = s (B A - B0 A0) is small after
    # 3 steps while B A itself is not (a plain LoRA's B starts at 0 instead)
    pissa = rows["pissa"][1].modules
    for m in pissa.values():
        r = m.rank // 2
        full = m.scale * m.B[:, :r] @ m.A[:r]
        assert float(m.delta_w().norm()) < 0.5 * float(full.norm())
    # the pack-time option adds the spectral columns (lora-zoo pack --analyze)
    from lora_zoo.cli import main

    assert main(["pack", str(tmp_path / "z"), "--out", str(tmp_path / "p"), "--analyze"]) == 0
    packed = load_zoo(tmp_path / "p", verify=True)["train"]
    assert "spectral.top_sv.mean" in packed.label_columns and len(packed) == 4
