"""The software and hardware environment a zoo was built in, and how far another one drifted.

Why: a zoo is a measurement. Two builds of one recipe are bit-identical only in the same
environment (same distributions, same BLAS, same CPU/GPU, same thread count); anywhere else they
differ by floating-point noise, and a user comparing a rebuild against a published zoo must be able
to tell that noise (drift) from a bug. So every zoo stores the full set of installed
distributions, the BLAS/LAPACK build and the hardware; ``rebuild`` and ``diff`` print what drifted
and whether identical bytes should be expected; ``lora-zoo env`` prints the command that recreates
the environment.

This module also holds the start-up check of the transformers / PEFT pair: a combination that
transformers itself refuses (it raises deep inside ``from_pretrained``/``load_adapter``) is
reported in one line before any work starts.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_FORMAT = 1  # bumped when the layout of capture() changes
REQUIREMENTS_NAME = "requirements.txt"  # written into every built zoo

# Distributions whose version changes floating-point results (kernels, init, tokenization,
# sampling, serialization). A drift in any other distribution (pytest, moto, ...) does not.
NUMERIC = frozenset(
    {
        "torch",
        "numpy",
        "scipy",
        "transformers",
        "tokenizers",
        "peft",
        "diffusers",
        "accelerate",
        "safetensors",
        "pyarrow",
        "datasets",
        "gguf",
        "scikit-learn",
        "lora-zoo",
    }
)


def _norm(name: str) -> str:
    """PEP 503 normalized distribution name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions() -> dict[str, str]:
    """Every distribution importable from this interpreter, ``{normalized name: version}``.

    The first one on ``sys.path`` wins, as it does for ``import``."""
    out: dict[str, str] = {}
    for d in md.distributions():
        name = d.metadata.get("Name")
        if name and _norm(name) not in out:
            out[_norm(name)] = d.version
    return dict(sorted(out.items()))


def blas() -> dict[str, Any]:
    """The BLAS/LAPACK that torch and numpy were built against (they pick different kernels,
    hence different rounding, per library and per CPU feature set)."""
    out: dict[str, Any] = {}
    try:
        import torch

        cfg = torch.__config__.show()
        for key in ("BLAS_INFO", "LAPACK_INFO"):
            m = re.search(rf"{key}=([^,\s]+)", cfg)
            out[f"torch_{key.lower()}"] = m.group(1) if m else None
        m = re.search(r"CPU capability usage: (\S+)", cfg)
        out["torch_cpu_capability"] = m.group(1) if m else None
        out["torch_mkl"] = bool(torch.backends.mkl.is_available())
        out["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except Exception as e:  # pragma: no cover - bookkeeping must not break a build
        log.debug("no torch BLAS info: %s", e)
    try:
        import numpy as np

        deps = (np.show_config(mode="dicts") or {}).get("Build Dependencies", {})
        for key in ("blas", "lapack"):
            d = deps.get(key) or {}
            out[f"numpy_{key}"] = f"{d.get('name')} {d.get('version')}".strip() if d else None
    except Exception as e:  # pragma: no cover - numpy < 1.25 has no mode="dicts"
        log.debug("no numpy BLAS info: %s", e)
    return out


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of visible CUDA devices (empty without torch / CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # a broken driver must not break a build's bookkeeping
        log.debug("no GPU info: %s", e)
    return []


def torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return None


def capture() -> dict[str, Any]:
    """This process's environment, JSON-able (stored in ``info.provenance.environment``)."""
    return {
        "env_format": ENV_FORMAT,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads(),
        "gpus": gpu_names(),
        "blas": blas(),
        "distributions": distributions(),
    }


#: a distribution name as PEP 508 allows it (PEP 503 normalises it); nothing else may reach pip
_DIST_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
#: a public PEP 440 version, optionally with a local label (``2.13.0+cpu``); no spaces, no
#: ``@ url``, no ``;`` marker, no ``,`` ranges: exactly one pinned release
_PEP440 = re.compile(
    r"^(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]*)?"
    r"(?:(?:-[0-9]+)|(?:[-_.]?(?:post|rev|r)[-_.]?[0-9]*))?(?:[-_.]?dev[-_.]?[0-9]*)?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$",
    re.I,
)
#: the torch wheel indexes lora-zoo itself may point pip at (from torch's local version label)
_TORCH_FLAVOUR = re.compile(r"^(?:cpu|cu[0-9]{2,4}|rocm[0-9]+(?:\.[0-9]+)*|xpu)$")


def _comment(value: Any) -> str:
    """A value from a zoo, safe inside a ``#`` comment: one line, printable characters only."""
    return re.sub(r"[^\x20-\x7e]", "?", str(value))[:200]


def requirement_lines(env: Mapping[str, Any], *, file: str | None = None) -> list[str]:
    """``name==version`` lines for ``env``'s distributions, each checked as PEP 508 / PEP 440.

    Why strict: a zoo's provenance is a stranger's text and this file is handed to ``pip install
    -r``; a name or version holding ``--index-url``, ``-e git+``, ``@ url`` or a marker would make
    pip fetch and run code from anywhere. Anything but a plain pin is refused (``ZooFormatError``
    naming every bad key), never dropped silently, so no file with such a line is ever written."""
    from lora_zoo.errors import ZooFormatError

    dists = env.get("distributions") or {}
    where = "info.provenance.environment.distributions"
    if not isinstance(dists, Mapping):
        raise ZooFormatError("must be an object {name: version}", file=file, key=where)
    bad = [
        f"{name!r}: {version!r}"
        for name, version in dists.items()
        if not (isinstance(name, str) and _DIST_NAME.match(name))
        or not (isinstance(version, str) and _PEP440.match(version))
    ]
    if bad:
        raise ZooFormatError(
            "not a plain PEP 508 name==version pin (refused, nothing written): " + "; ".join(bad),
            file=file,
            key=where,
        )
    lines = []
    flavour = str(dists.get("torch", "")).partition("+")[2]
    if _TORCH_FLAVOUR.match(flavour):
        lines.append(f"--extra-index-url https://download.pytorch.org/whl/{flavour}")
    for name, version in dists.items():
        if name in ("pip", "setuptools", "wheel"):
            continue
        if name == "lora-zoo":
            lines.append(
                f"# lora-zoo=={version} (install this version or the commit in provenance)"
            )
            continue
        lines.append(f"{name}=={version}")
    return lines


def requirements_text(env: Mapping[str, Any], *, source: str = "", file: str | None = None) -> str:
    """A pip requirements file that recreates ``env``'s distributions (``requirement_lines``).

    lora-zoo itself is left as a comment when it is not a release (an editable checkout has no
    index entry); a local torch build such as ``2.13.0+cpu`` comes with the index that serves it.
    """
    head = [
        f"# The environment a lora-zoo zoo was built in{f' ({_comment(source)})' if source else ''}.",
        f"# Python {_comment(env.get('python'))} on {_comment(env.get('machine'))} "
        f"({_comment(env.get('platform'))}),",
        f"# CPU {_comment(env.get('cpu'))}, GPUs "
        f"{_comment(', '.join(map(str, env.get('gpus') or [])) or 'none')}.",
        "# Recreate: python -m venv env && . env/bin/activate && pip install -r requirements.txt",
    ]
    return "\n".join(head + requirement_lines(env, file=file)) + "\n"


@dataclass(frozen=True)
class Drift:
    """One thing that differs between two environments."""

    what: str  # a distribution name, or "python", "cpu", "blas.torch_blas_info", ...
    zoo: str
    here: str
    numeric: bool  # can it change floating-point results?


_FIELDS = ("python", "machine", "cpu", "torch_threads", "gpus")


def drift(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[Drift]:
    """What differs between environment ``a`` (the zoo's) and ``b`` (here, or a second zoo).

    Zoos written before full environments were stored (env_format absent) only name a few
    libraries under ``libraries``; those are compared, and the missing rest is reported once."""
    a, b = dict(a or {}), dict(b or {})
    out: list[Drift] = []
    for f in _FIELDS:
        va, vb = a.get(f), b.get(f)
        if va is not None and vb is not None and va != vb:
            out.append(Drift(f, _s(va), _s(vb), numeric=True))
    ba, bb = a.get("blas") or {}, b.get("blas") or {}
    for k in sorted(set(ba) & set(bb)):
        if ba[k] != bb[k]:
            out.append(Drift(f"blas.{k}", _s(ba[k]), _s(bb[k]), numeric=True))
    da = a.get("distributions") or {_norm(k): v for k, v in (a.get("libraries") or {}).items()}
    db = b.get("distributions") or {_norm(k): v for k, v in (b.get("libraries") or {}).items()}
    if not a.get("distributions") or not b.get("distributions"):
        keys = set(da) & set(db)  # a partial record: only compare what both name
        side = "zoo" if not a.get("distributions") else "here"
        out.append(Drift("(full environment)", "not recorded" if side == "zoo" else "recorded",
                         "recorded" if side == "zoo" else "not recorded", numeric=False))  # fmt: skip
    else:
        keys = set(da) | set(db)
    for k in sorted(keys):
        va, vb = da.get(k), db.get(k)
        if va != vb:
            out.append(Drift(k, va or "-", vb or "-", numeric=k in NUMERIC))
    return out


def _s(v: Any) -> str:
    return ", ".join(map(str, v)) or "none" if isinstance(v, list) else str(v)


def bit_identical_expected(rows: list[Drift]) -> bool:
    """True when nothing that can change floating-point results drifted."""
    return not any(r.numeric for r in rows)


def format_drift(rows: list[Drift], *, left: str = "zoo", right: str = "here") -> str:
    """The drift table and its verdict, for humans."""
    if not rows:
        return f"environment: {left} and {right} match exactly; bit-identical output expected."
    w = max(len(r.what) for r in rows)
    wz = max(len(left), *(len(r.zoo) for r in rows))
    lines = [f"environment drift ({len(rows)}):", f"  {'package':<{w}}  {left:<{wz}}  {right}"]
    for r in rows:
        mark = "" if r.numeric else "   (no numeric effect)"
        lines.append(f"  {r.what:<{w}}  {r.zoo:<{wz}}  {r.here}{mark}")
    if bit_identical_expected(rows):
        lines.append("nothing that changes numerics drifted: bit-identical output expected.")
    else:
        lines.append(
            "numerics-relevant drift: expect floating-point differences, not identical bytes "
            "(compare with diff --atol/--rtol; recreate the environment with `lora-zoo env`)."
        )
    return "\n".join(lines)


# --- the transformers / PEFT pair ------------------------------------------------------------


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _required_peft(transformers_version: str) -> str | None:
    """The PEFT floor the installed transformers enforces, read from its metadata (its ``peft``
    extra) without importing it; falls back to what transformers' own check says."""
    try:
        for req in md.requires("transformers") or []:
            m = re.match(r"peft\s*>=\s*([\d.]+)", req.replace(" ", ""))
            if m:
                return m.group(1)
    except md.PackageNotFoundError:
        return None
    known = ((5, 24), "0.22.0"), ((5, 0), "0.20.0")  # from transformers' MIN_PEFT_VERSION
    tv = _version_tuple(transformers_version)
    for floor, peft in known:
        if tv[:2] >= floor:
            return peft
    return None


def stack_problems() -> list[str]:
    """One line per installed combination that cannot work (empty when all is well)."""
    try:
        tv, pv = md.version("transformers"), md.version("peft")
    except md.PackageNotFoundError as e:
        return [f"{e.name} is not installed; fix: pip install -c requirements.lock -e ."]
    need = _required_peft(tv)
    if need and _version_tuple(pv) < _version_tuple(need):
        return [
            f"peft {pv} is installed but transformers {tv} needs peft>={need}; fix: "
            f"pip install 'transformers<5.24' (or a peft>={need} when released), or install "
            "from the lock: pip install -c requirements.lock -e ."
        ]
    return []


__all__ = [
    "NUMERIC",
    "REQUIREMENTS_NAME",
    "Drift",
    "bit_identical_expected",
    "blas",
    "capture",
    "distributions",
    "drift",
    "format_drift",
    "requirements_text",
    "stack_problems",
]
