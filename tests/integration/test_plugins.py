"""Adding a loader view, a LoL model, an ingest format or a build backend is ONE new file in
its folder: each test drops a tiny example file into the package's search path (never into
the source tree), lets the registry discover it, runs it through the real consumer (the
dataset, the bench, detection + ingest, the runner) and removes it afterwards."""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lora_zoo.registry import Registry


@pytest.fixture
def drop_in(tmp_path, monkeypatch):
    """``drop_in(package, registry, module, source)``: put ``module.py`` on ``package``'s path,
    as a contributor would add the file; unregisters what it registered afterwards."""
    added: list[tuple[Registry, set[str], str]] = []

    def put(package: str, registry: Registry, module: str, source: str) -> None:
        pkg = importlib.import_module(package)
        before = set(registry.names())
        folder = tmp_path / "dropin" / package.replace(".", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(folder)])
        monkeypatch.setattr(registry, "_discovered", False)
        added.append((registry, before, f"{package}.{module}"))

    yield put
    for registry, before, modname in added:
        for name in set(registry._entries) - before:
            registry.unregister(name)
        sys.modules.pop(modname, None)


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    from tests.fixtures.zoos import make_zoo

    return make_zoo(
        tmp_path_factory.mktemp("p") / "zoo", n=12, splits={"train": 0.75, "test": 0.25}
    )


VIEW = """
    import torch
    from lora_zoo.load.views import register_view

    @register_view("tiny_frob")
    def tiny_frob(u, v, ctx):
        '''||U V^T||_F per module, in float64 (GL(r)-invariant).'''
        w = u.double() @ v.double().transpose(-1, -2)  # (..., n, m)
        return {"S": torch.linalg.matrix_norm(w)[..., None]}  # (..., 1)
"""


def test_a_view_is_one_file(drop_in, small_zoo):
    from lora_zoo import load_zoo
    from lora_zoo.load.datasets import LoraDataset
    from lora_zoo.load.views import VIEWS

    drop_in("lora_zoo.load.views", VIEWS, "tiny_frob", VIEW)
    assert "tiny_frob" in VIEWS.names()
    split = load_zoo(str(small_zoo))["train"]
    got, ref = LoraDataset(split, "tiny_frob")[0], LoraDataset(split, "factors")[0]
    for name, mod in ref["modules"].items():
        u, v = mod["U"].double(), mod["V"].double()  # (n, r), (m, r)
        # reference: ||U V^T||_F^2 = tr((U^T U)(V^T V)), another summation order; float64 with
        # n m r < 1e4 terms: 10 eps n m r relative (tol's c=10), far below any real difference
        want = torch.trace((u.T @ u) @ (v.T @ v)).sqrt()
        bound = 10 * torch.finfo(torch.float64).eps * u.shape[0] * v.shape[0] * u.shape[1]
        assert abs(float(got["modules"][name]["S"][0]) - float(want)) <= bound * float(want)


MODEL = """
    import torch
    from torch import nn
    from lora_zoo.lol.models import LolModel, register_model

    class TinyNorms(LolModel):
        '''Linear read-out of each module's log ||s||_2 (= log ||ΔW||_F).'''

        def __init__(self, specs, out_dim):
            super().__init__(specs)
            self.lin = nn.Linear(len(self.specs), out_dim)

        def forward(self, modules):
            some = next(iter(modules.values()))["S"]
            cols = [
                torch.log(modules[s.name]["S"].norm(dim=-1) + 1e-12)
                if s.name in modules
                else some.new_zeros(some.shape[0])
                for s in self.specs
            ]
            return self.lin(torch.stack(cols, 1).float())  # (b, out)

        def calibrate(self, modules):
            pass

    @register_model("tiny_norms", symmetry={"svals": "GL(r)"}, order=50)
    def make(specs, out_dim, view, **hp):
        '''Log-norm linear probe.'''
        return TinyNorms(specs, out_dim, **hp)
"""


def test_a_lol_model_is_one_file(drop_in, small_zoo):
    from lora_zoo.lol.bench import default_runs, plan_runs, run_bench
    from lora_zoo.lol.models import MODELS

    drop_in("lora_zoo.lol.models", MODELS, "tiny_norms", MODEL)
    assert ("tiny_norms", "svals") in default_runs()
    # its declared symmetry decides the augmentation: GL(r)-invariant -> no augmented copy
    assert ("tiny_norms", "svals", True) not in plan_runs(["tiny_norms"], None, True)
    from lora_zoo.lol.bench import TrainConfig

    res = run_bench(
        small_zoo,
        "eval_loss",
        models=["baseline", "tiny_norms"],
        repeats=1,
        train=TrainConfig(max_epochs=3, patience=3),
        write=False,
        progress=False,
    )
    runs = {r["model"]: r for r in res["runs"]}
    assert runs["tiny_norms"]["invariance"] == "GL(r)" and runs["baseline"]["invariance"] == "-"
    assert math.isfinite(runs["tiny_norms"]["summary"]["r2"]["mean"])
    assert runs["tiny_norms"]["hparams"]["parameters"] == 4 + 1  # 4 modules -> 1 output


FORMAT = """
    import json
    from pathlib import Path
    from safetensors import safe_open
    from safetensors.torch import save_file
    from lora_zoo.contrib.formats import AdapterFormat, register_format
    from lora_zoo.contrib.formats.common import module_from_factors
    from lora_zoo.record import LoraRecord

    def sniff(keys, path=None):
        ks = list(keys)
        return bool(ks) and all(k.startswith("tiny/") for k in ks)

    def read(path, *, allow_pickle_conversion=False, max_bytes=None):
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["tiny"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        mods = {
            m: module_from_factors(t[f"tiny/{m}/A"], t[f"tiny/{m}/B"], a)
            for m, a in meta["alpha"].items()
        }
        rec = LoraRecord(mods, meta["config"])
        rec.validate(file=str(path))
        return rec

    def write(record, path):
        t, alpha = {}, {}
        for m, mod in record:
            t[f"tiny/{m}/A"], t[f"tiny/{m}/B"] = mod.A.contiguous(), mod.B.contiguous()
            alpha[m] = mod.alpha
        meta = {"tiny": json.dumps({"alpha": alpha, "config": record.config})}
        save_file(t, str(path), metadata=meta)
        return Path(path)

    register_format(AdapterFormat("tinyfmt", sniff, read, write, key_order=5))
"""


def test_an_ingest_format_is_one_file(drop_in, tmp_path):
    from lora_zoo import load_zoo
    from lora_zoo.contrib.formats import FORMATS, read_adapter, write_adapter
    from lora_zoo.contrib.formats.detect import detect_format
    from lora_zoo.contrib.ingest import ingest
    from tests.fixtures.zoos import make_record

    drop_in("lora_zoo.contrib.formats", FORMATS, "tinyfmt", FORMAT)
    rec = make_record(0, 4)
    src = tmp_path / "src"
    src.mkdir()
    f = write_adapter(rec, src / "one.safetensors", "tinyfmt")
    assert detect_format(f) == "tinyfmt"
    back = read_adapter(f)
    assert back.lora_id == "one" and set(back.modules) == set(rec.modules)
    rep = ingest([str(src)], tmp_path / "zoo")
    assert rep["counts"]["accepted"] == 1, rep["rejected"]
    zoo = load_zoo(str(tmp_path / "zoo"))
    got = zoo[zoo.splits[0]].record(0)
    assert set(got.modules) == set(rec.modules)
    for name, mod in rec:
        stored = got.modules[name]
        assert torch.equal(stored.A, mod.A) and torch.equal(stored.B, mod.B)  # bit-exact copy


BACKEND = """
    from lora_zoo.build.backends import Backend, register_backend

    CALLS = []

    def trainer(recipe, device, todo, *, store=None, build="", options=None):
        builder = recipe.builder_cls(recipe.config, device=device)

        def train(chunk, attempt):
            CALLS.append([j.index for j in chunk])
            return builder.train(chunk)

        return train

    register_backend(Backend("inline", trainer, options=("verbose",), doc="test backend"))
"""


def test_a_build_backend_is_one_file(drop_in, tmp_path):
    from lora_zoo.build import runner
    from lora_zoo.build.backends import BACKENDS
    from lora_zoo.errors import BuildError
    from tests.fixtures.toy_builder import register, toy_recipe, zoo_snapshot

    register()
    drop_in("lora_zoo.build.backends", BACKENDS, "inline", BACKEND)
    p = tmp_path / "toy.yaml"
    p.write_text(toy_recipe(num_loras=4))
    local = runner.build(p, tmp_path / "local", progress=False)
    inline = runner.build(p, tmp_path / "inline", progress=False, backend="inline")
    assert sys.modules["lora_zoo.build.backends.inline"].CALLS  # it, not local, trained
    assert inline.counts == local.counts
    assert zoo_snapshot(tmp_path / "inline") == zoo_snapshot(tmp_path / "local")
    with pytest.raises(BuildError, match="did you mean 'inline'"):
        runner.build(p, tmp_path / "x", progress=False, backend="inlin")
    # the CLI takes its --backend names and option owners from the registry
    from lora_zoo.cli.build import _check_backend

    with pytest.raises(BuildError, match="--address needs --backend ray"):
        _check_backend("inline", {"address": "auto"}, "cpu")
    _check_backend("inline", {"verbose": True}, "cpu")


def test_cli_help_lists_registered_names(capsys):
    from lora_zoo.cli import main

    for argv, names in (
        (["bench", "--help"], ["baseline", "glnet", "canonical"]),
        (["build", "--help"], ["local", "ray"]),
        (["export", "--help"], ["peft", "diffusers", "kohya"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert all(n in out for n in names), (argv, out)


def test_every_registered_name_is_documented():
    """CONTRIBUTING.md or docs/ name every built-in plug-in (as `name`)."""
    from lora_zoo.build.backends import BACKENDS
    from lora_zoo.build.registry import BUILDERS
    from lora_zoo.contrib.formats import FORMATS
    from lora_zoo.load.views import VIEWS
    from lora_zoo.lol.models import MODELS

    root = Path(__file__).resolve().parents[2]
    text = (root / "CONTRIBUTING.md").read_text() + "".join(
        p.read_text() for p in sorted((root / "docs").glob("*.md"))
    )
    kinds = {
        "builder": [n for n in BUILDERS.names() if not n.startswith("toy")],  # not test ones
        "view": VIEWS.names(),
        "LoL model": MODELS.names(),
        "format": FORMATS.names(),
        "backend": BACKENDS.names(),
    }
    missing = [f"{k} {n}" for k, ns in kinds.items() for n in ns if f"`{n}`" not in text]
    assert not missing, f"undocumented plug-ins: {missing}"
