"""seeding.py: the seed formula is fixed forever, so check it against hashlib by hand."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lora_zoo.seeding import JOB_STREAMS, STREAMS, derive_seed, job_seeds, rng


def _by_hand(seed: int, index: int, stream: str, bits: int = 63) -> int:
    d = hashlib.sha256(f"lora-zoo/seed/v1/{seed}/{index}/{stream}".encode()).digest()
    return int.from_bytes(d[:8], "big") >> (64 - bits)


@pytest.mark.parametrize("stream", [*STREAMS, "hparams/lr", "subset/count"])
@pytest.mark.parametrize("seed,index", [(0, 0), (7, 3), (123456789, 1999), (-5, -1)])
def test_formula_matches_sha256(seed, index, stream):
    assert derive_seed(seed, index, stream) == _by_hand(seed, index, stream)
    assert derive_seed(seed, index, stream, bits=31) == _by_hand(seed, index, stream, 31)


def test_golden_values_never_change():
    # Frozen numbers: a change here means every published zoo's seeds changed.
    assert derive_seed(0, 0, "init") == _by_hand(0, 0, "init")
    assert derive_seed(7, 0, "data") == 8387240743853874096
    assert derive_seed(7, 0, "init") == 2173746050211483490


def test_ranges_and_independence():
    seeds = [derive_seed(1, i, s) for i in range(200) for s in STREAMS]
    assert len(set(seeds)) == len(seeds)  # no collisions across indices / streams
    assert all(0 <= s < 2**63 for s in seeds)
    assert all(0 <= derive_seed(1, i, "init", bits=31) < 2**31 for i in range(200))
    assert derive_seed(1, 0, "init") != derive_seed(2, 0, "init")


def test_job_seeds_and_rng():
    js = job_seeds(3, 5)
    assert tuple(js) == JOB_STREAMS
    assert {"init", "data", "dropout"} <= set(js)
    assert js["init"] == derive_seed(3, 5, "init")
    a = rng(3, 5, "hparams/lr").random(4)
    b = rng(3, 5, "hparams/lr").random(4)
    np.testing.assert_array_equal(a, b)
    ref = np.random.Generator(np.random.PCG64(derive_seed(3, 5, "hparams/lr"))).random(4)
    np.testing.assert_array_equal(a, ref)
    assert not np.array_equal(a, rng(3, 6, "hparams/lr").random(4))


@pytest.mark.parametrize(
    "kw,exc",
    [
        ({"stream": "bogus"}, ValueError),
        ({"stream": "bogus/sub"}, ValueError),
        ({"index": -2}, ValueError),
        ({"index": True}, ValueError),
        ({"recipe_seed": 1.5}, TypeError),
        ({"recipe_seed": True}, TypeError),
        ({"bits": 32}, ValueError),
    ],
)
def test_bad_arguments(kw, exc):
    args = {"recipe_seed": 1, "index": 0, "stream": "init", **kw}
    with pytest.raises(exc):
        derive_seed(**args)


def _by_hand_sub(seed: int, *names: str, bits: int = 63) -> int:
    d = hashlib.sha256("/".join(("lora-zoo/sub/v1", str(seed), *names)).encode()).digest()
    return int.from_bytes(d[:8], "big") >> (64 - bits)


@pytest.mark.parametrize("names", [("augment",), ("bench", "repeat0"), ("vae",), ("order",)])
@pytest.mark.parametrize("seed", [0, 7, 2**62, -3])
def test_sub_seed_matches_sha256_and_streams_differ(seed, names):
    from lora_zoo.seeding import sub_seed

    assert sub_seed(seed, *names) == _by_hand_sub(seed, *names)
    assert sub_seed(seed, *names, bits=31) == _by_hand_sub(seed, *names, bits=31) < 2**31
    assert sub_seed(seed, *names) != sub_seed(seed, *names, "x")
    assert sub_seed(seed, *names) != sub_seed(seed + 1, *names)


def test_sub_seed_refuses_bad_input():
    from lora_zoo.seeding import sub_seed

    with pytest.raises(ValueError):
        sub_seed(1)
    with pytest.raises(ValueError):
        sub_seed(1, "")
    with pytest.raises(TypeError):
        sub_seed(True, "a")


# --- the rule "seeds are derived only in lora_zoo/seeding.py", checked on the tree ---------------
_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _seed_arithmetic(path) -> list[str]:
    """``seed + 1``, ``1000 * split_seed + rep``, ``seeds["data"] + 1``: any + - * ^ whose operand
    is a name, attribute or subscript mentioning 'seed' (the idiom that made streams collide)."""
    import ast

    def mentions_seed(node) -> bool:
        return any(
            (isinstance(n, ast.Name) and "seed" in n.id.lower())
            or (isinstance(n, ast.Attribute) and "seed" in n.attr.lower())
            or (isinstance(n, ast.Constant) and isinstance(n.value, str) and "seed" in n.value)
            for n in ast.walk(node)
            if not isinstance(n, ast.Call)
        ) and not isinstance(node, ast.Call)

    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(
            node.op, (ast.Add, ast.Sub, ast.Mult, ast.BitXor)
        ):
            if mentions_seed(node.left) or mentions_seed(node.right):
                rel = path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path
                out.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_seed_arithmetic_outside_seeding():
    hits = []
    for folder in ("lora_zoo", "builders", "cards"):
        for path in sorted((_ROOT / folder).rglob("*.py")):
            if path.name == "seeding.py" and path.parent.name == "lora_zoo":
                continue
            hits += _seed_arithmetic(path)
    assert not hits, (
        "derive a named sub-stream with lora_zoo.seeding.sub_seed instead:\n" + "\n".join(hits)
    )


def test_the_scan_catches_the_idioms(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text('a = seed + 7919\nb = 1000 * spec.split_seed + rep\nc = seeds["data"] + 1\n')
    assert len(_seed_arithmetic(f)) >= 3  # the nested BinOp of b also counts
