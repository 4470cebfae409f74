"""Recipe loading and validation: YAML -> includes -> overrides -> one validated ``Recipe``.

Why all problems at once: a recipe is edited, then a build is started that may run for hours;
finding typos one per attempt is a waste. Every problem is reported in one ``RecipeError`` as
``file: dotted.field - message``, including problems found by the builder's own pydantic
``Config`` for the builder-facing sections (``base_model, lora, data, train, eval,
builder_args``), prefixed with their section. Unknown keys are errors everywhere.

Variants: ``include: base.yaml`` (or a list) loads other recipes first (relative to the
including file, else a recipe shipped in ``lora_zoo.recipes``) and deep-merges this file's keys
over them (dicts merge key by key; everything else is replaced). CLI overrides
``key.path=value`` are applied last, the value parsed as YAML (``train.lr=3e-4``,
``vary.r='{kind: choice, values: [4, 8]}'``).

A ``Recipe`` keeps the original text and the resolved (merged) dict: the zoo stores both, and
the resolved dict (self-contained, no includes) is what ``rebuild`` re-runs.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lora_zoo.build.api import BUILDER_SECTIONS
from lora_zoo.build.space import KINDS, _Dist, parse_dist
from lora_zoo.errors import BuilderNotFoundError, BuildError, RecipeError

log = logging.getLogger(__name__)

TOP_KEYS = (
    "name",
    "builder",
    "seed",
    "num_loras",
    "lora_id_format",
    "subset",
    "vary",
    "output",
    *BUILDER_SECTIONS,
)
DEFAULT_ID_FORMAT = "{name}-{index:05d}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    kind: Literal["random", "group", "none"] = "random"
    fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "test": 0.2})
    key: str | None = None
    seed: int = 0
    lists: Literal["set", "components"] = "set"

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        if self.kind == "group" and not self.key:
            raise ValueError("a group split needs key: <metadata column> (e.g. groups_included)")
        if self.kind != "none":
            if any(f < 0 or f > 1 for f in self.fractions.values()):
                raise ValueError("fractions must lie in [0, 1]")
            if abs(sum(self.fractions.values()) - 1) > 1e-6:
                raise ValueError(f"fractions sum to {sum(self.fractions.values())}, not 1")
        return self


class OutputSpec(_Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    shard_rows: int = Field(1000, ge=1)
    split: SplitSpec = Field(default_factory=SplitSpec)
    collection: str = "default"


class SubsetSpec(_Strict):
    """Which data groups each LoRA trains on (see plan.py for the exact rules)."""

    groups: list[str] | Literal["from_data"] | None = None
    mode: Literal["leave_out", "include", "all"] = "all"
    count: Any = None  # int or distribution
    size: Any = None  # int, distribution or null (= every example of the chosen groups)
    assign: Literal["random", "cycle"] = "random"

    @model_validator(mode="after")
    def _check(self) -> SubsetSpec:
        if self.mode != "all" and self.groups is None:
            raise ValueError(f"mode {self.mode!r} needs groups: [..] or groups: from_data")
        if self.mode != "all" and self.count is None:
            raise ValueError(f"mode {self.mode!r} needs count")
        if isinstance(self.groups, list) and len(set(self.groups)) != len(self.groups):
            raise ValueError("groups has duplicates")
        return self


class RecipeModel(_Strict):
    """The recipe's own (non-builder) fields; builder sections are passed through as dicts."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    builder: str
    seed: int
    num_loras: int = Field(ge=1)
    lora_id_format: str = DEFAULT_ID_FORMAT
    subset: SubsetSpec | None = None
    vary: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    base_model: Any = None
    lora: Any = None
    data: Any = None
    train: Any = None
    eval: Any = None
    builder_args: Any = None
    poison: Any = None  # causal_lm backdoor zoos (builders/causal_lm/poison.py)


@dataclass
class Recipe:
    """A validated recipe: the fields plus the builder's validated Config."""

    model: RecipeModel
    config: BaseModel
    builder_cls: type
    resolved: dict[str, Any]
    text: str
    file: str
    vary: dict[str, _Dist] = field(default_factory=dict)
    subset_count: _Dist | None = None
    subset_size: _Dist | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def seed(self) -> int:
        return self.model.seed

    @property
    def builder(self) -> str:
        return self.model.builder

    @property
    def k(self) -> int:
        """LoRAs per ``builder.train`` call (``train.k``; 1 when the recipe has none)."""
        train = self.resolved.get("train") or {}
        return int(train.get("k", 1)) if isinstance(train, Mapping) else 1

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved, sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        """Identity of the resolved recipe (key order and formatting do not matter)."""
        return recipe_sha256(self.resolved)


def recipe_sha256(resolved: Mapping[str, Any]) -> str:
    canon = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


# ---- merging, includes, overrides -------------------------------------------------------------
def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` wins; dicts merge recursively; lists and scalars are replaced whole."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` / ``1e5`` as floats (YAML 1.2 does; PyYAML's 1.1
    resolver wants a dot, ``3.0e-4``, and silently yields the *string* ``"3e-4"``, which a
    ``vary: {lr: 3e-4}`` constant would hand to the builder as text)."""


_RecipeLoader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse recipe YAML safely (no object tags; see ``_RecipeLoader`` for floats)."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _safe_load(text: str, file: str) -> dict[str, Any]:
    from lora_zoo._io import load_untrusted_yaml
    from lora_zoo.errors import ZooFormatError

    try:  # bounded: size, depth, no aliases (a recipe may come from a stranger's zoo)
        data = load_untrusted_yaml(text, file=file, loader=_RecipeLoader)
    except ZooFormatError as e:
        raise RecipeError([f"{file}: (yaml) - {e.message}"], file=file) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [f"{file}: (top) - a recipe is a YAML mapping, got {type(data).__name__}"], file=file
        )
    return data


def _find_include(name: str, base_dir: Path | None, file: str) -> tuple[str, str]:
    cands = [base_dir / name] if base_dir is not None else []
    cands.append(Path(name))
    for p in cands:
        if p.is_file():
            return p.read_text(encoding="utf-8"), str(p)
    try:
        res = resources.files("lora_zoo.recipes").joinpath(name)
        if res.is_file():
            return res.read_text(encoding="utf-8"), f"lora_zoo.recipes/{name}"
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover
        pass
    raise RecipeError([f"{file}: include - file {name!r} not found"], file=file)


def _resolve_includes(
    data: dict[str, Any], file: str, base_dir: Path | None, stack: tuple[str, ...]
) -> dict[str, Any]:
    inc = data.pop("include", None)
    if inc is None:
        return data
    names = [inc] if isinstance(inc, str) else inc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError([f"{file}: include - must be a file name or a list of them"], file=file)
    merged: dict[str, Any] = {}
    for n in names:
        text, path = _find_include(n, base_dir, file)
        key = str(Path(path).resolve()) if not path.startswith("lora_zoo.") else path
        if key in stack:
            raise RecipeError([f"{file}: include - include cycle through {path}"], file=file)
        sub = _safe_load(text, path)
        sub_dir = Path(path).parent if not path.startswith("lora_zoo.") else None
        sub = _resolve_includes(sub, path, sub_dir, (*stack, key))
        merged = deep_merge(merged, sub)
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError([f"<--set>: {item} - expected key.path=value"])
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        path, value = parse_override(item)
        cur = out
        for i, p in enumerate(path[:-1]):
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                problems.append(
                    f"<--set>: {'.'.join(path[: i + 1])} - is not a mapping, "
                    f"cannot set {'.'.join(path)}"
                )
                break
            cur = nxt
        else:
            cur[path[-1]] = value
    if problems:
        raise RecipeError(problems)
    return out


# ---- bounds on what a stranger's recipe controls -----------------------------------------------
#: generic caps on the YAML tree (checked before pydantic or a builder allocates anything)
MAX_STRING = 4096
MAX_LIST = 100_000
MAX_DEPTH = 32
MAX_ID_LEN = 200
#: caps on sizes by key, wherever the key appears (``train.k``, ``vary.r.choices.0``, ...):
#: far above any real zoo, far below what would exhaust a machine before the first LoRA
SIZE_CAPS: dict[str, int] = {
    "num_loras": 1_000_000,
    "k": 4096,
    "steps": 10_000_000,
    "pretrain_steps": 10_000_000,
    "warmup_steps": 10_000_000,
    "epochs": 100_000,
    "r": 65_536,
    "count": 1_000_000,
    "size": 100_000_000,
    "n_examples": 100_000_000,
    "max_examples": 100_000_000,
    "batch_size": 1_000_000,
    "pretrain_batch_size": 1_000_000,
    "micro_batch_size": 1_000_000,
    "grad_accum": 1_000_000,
    "max_seq_len": 1_000_000,
    "resolution": 16_384,
    "shard_rows": 10_000_000,
    "latent_cache_size": 10_000_000,
}
_WIDE_FORMAT = re.compile(r"\{[^{}]*[:!][^{}]*\d{4,}[^{}]*\}")  # a field width of 1000+


def _bounds(data: Any, file: str) -> list[str]:
    """Every size in the recipe tree that is over its cap (one message each, all at once)."""
    problems: list[str] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        where = ".".join(path) or "(top)"
        if len(path) > MAX_DEPTH:
            problems.append(f"{file}: {where} - nested deeper than {MAX_DEPTH} levels")
            return
        if isinstance(node, str) and len(node) > MAX_STRING:
            problems.append(
                f"{file}: {where} - string of {len(node)} characters (cap {MAX_STRING})"
            )
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            caps = [SIZE_CAPS[p] for p in path if p in SIZE_CAPS]
            if caps and abs(node) > min(caps):
                problems.append(f"{file}: {where} - {node} is over the cap of {min(caps):,}")
        elif isinstance(node, Mapping):
            if len(node) > MAX_LIST:
                problems.append(f"{file}: {where} - {len(node)} keys (cap {MAX_LIST:,})")
                return
            for k, v in node.items():
                walk(v, (*path, str(k)[:64]))
        elif isinstance(node, list):
            if len(node) > MAX_LIST:
                problems.append(f"{file}: {where} - {len(node)} items (cap {MAX_LIST:,})")
                return
            for i, v in enumerate(node):
                walk(v, (*path, str(i)))

    walk(data, ())
    fmt = data.get("lora_id_format") if isinstance(data, Mapping) else None
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        problems.append(
            f"{file}: lora_id_format - a field width of 1000 or more (ids over {MAX_ID_LEN} chars)"
        )
    return problems


# ---- local paths a recipe names ----------------------------------------------------------------
#: keys whose string values a builder opens as a local path when one exists (a data folder, an
#: attribute table, data files, a base model folder, a dataset name that is also a folder)
_PATH_KEYS = frozenset({"include", "path", "paths", "root", "file", "files", "dir", "folder", "id"})
_PATH_SUFFIXES = ("_path", "_paths", "_dir", "_file", "_files", "_root", "_folder")


def _looks_local(value: str) -> bool:
    return (
        value.startswith(("/", "~", "./", "../", "file:"))
        or value in (".", "..")
        or (os.path.lexists(value))
    )


def _under(value: str, roots: Sequence[Path], base: Path | None) -> bool:
    p = Path(os.path.expanduser(value.removeprefix("file://")))
    p = (base / p if base is not None and not p.is_absolute() else p).resolve()
    return any(p == r or r in p.parents for r in (Path(r).resolve() for r in roots))


def local_path_problems(
    data: Any, file: str, allow: Sequence[str | os.PathLike[str]], base: Path | None = None
) -> list[str]:
    """The local paths an untrusted recipe (one stored in a zoo) would read: every value of a
    path-like key (``include``, ``paths``, ``root``, ``*_dir`` ...) that is a local path, and any
    string anywhere that is absolute, home- or dot-relative. Each is refused, naming the path,
    unless it resolves under one of ``allow`` (``lora-zoo rebuild --allow-path ROOT``)."""
    roots = [Path(a) for a in allow]
    problems: list[str] = []

    def check(value: str, where: str, pathy: bool) -> None:
        if (pathy and _looks_local(value)) or value.startswith(("/", "~", "./", "../", "file:")):
            if not _under(value, roots, base):
                problems.append(
                    f"{file}: {where} - would read the local path {value!r}; a stored recipe "
                    "reads nothing local unless you allow it (rebuild --allow-path ROOT)"
                )

    def walk(node: Any, path: tuple[str, ...], pathy: bool) -> None:
        if isinstance(node, str):
            check(node, ".".join(path), pathy)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                k = str(k)
                walk(v, (*path, k), pathy or k in _PATH_KEYS or k.endswith(_PATH_SUFFIXES))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, str(i)), pathy)

    walk(data, (), False)
    return problems


# ---- validation -------------------------------------------------------------------------------
def _clean_loc(loc: Sequence[Any], data: Any) -> str:
    """pydantic locations -> dotted path in the YAML, dropping union tags (``kind`` values)
    that pydantic inserts for discriminated unions but that are not keys of the input."""
    out: list[str] = []
    cur = data
    for part in loc:
        if isinstance(cur, Mapping) and part not in cur and cur.get("kind") == part:
            continue
        if isinstance(part, str) and part in KINDS and not isinstance(cur, Mapping):
            continue
        out.append(str(part))
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        else:
            cur = None
    return ".".join(out) or "(top)"


def _problems(e: ValidationError, data: Any, prefix: str, file: str) -> list[str]:
    out = []
    for err in e.errors():
        loc = _clean_loc(err["loc"], data)
        full = f"{prefix}.{loc}" if prefix and loc != "(top)" else (prefix or loc)
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{file}: {full} - {msg}")
    return out


def known_hparams(builder_cls: type) -> frozenset[str] | None:
    """The ``vary:`` keys a builder accepts: its ``HPARAMS`` class attribute, else its module's
    ``HPARAM_KEYS``; None when it declares neither (then any key passes to the builder).
    Why check here: a typo (``lrr``) would otherwise surface only when training starts."""
    names = getattr(builder_cls, "HPARAMS", None)
    if names is None:
        names = getattr(sys.modules.get(builder_cls.__module__), "HPARAM_KEYS", None)
    return frozenset(str(n) for n in names) if names is not None else None


def _dist(value: Any, where: str, file: str, problems: list[str]) -> _Dist | None:
    try:
        return parse_dist(value)
    except ValidationError as e:
        problems += _problems(e, value, where, file)
        return None


def _validate_dists(
    data: Mapping[str, Any], file: str, problems: list[str]
) -> tuple[dict[str, _Dist], _Dist | None, _Dist | None]:
    """``vary:`` and ``subset.count`` / ``subset.size``: every distribution parsed, errors kept."""
    vary: dict[str, _Dist] = {}
    raw_vary = data.get("vary") or {}
    if isinstance(raw_vary, Mapping):
        for k, v in raw_vary.items():
            d = _dist(v, f"vary.{k}", file, problems)
            if d is not None:
                vary[str(k)] = d
    found: dict[str, _Dist | None] = {"count": None, "size": None}
    sub = data.get("subset")
    if isinstance(sub, Mapping):
        for key in found:
            if sub.get(key) is not None:
                found[key] = _dist(sub[key], f"subset.{key}", file, problems)
    return vary, found["count"], found["size"]


def _validate_id_format(data: Mapping[str, Any], file: str, problems: list[str]) -> None:
    """``lora_id_format`` must give distinct ids of bounded length for every index."""
    fmt = data.get("lora_id_format", DEFAULT_ID_FORMAT)
    if not isinstance(fmt, str):
        return
    try:
        a = fmt.format(name=data.get("name", "x"), index=0)
        b = fmt.format(name=data.get("name", "x"), index=1)
        if a == b:
            problems.append(f"{file}: lora_id_format - must contain {{index}} (ids collide)")
        n = data.get("num_loras")
        last = fmt.format(name=data.get("name", "x"), index=n - 1 if isinstance(n, int) else 0)
        if len(last) > MAX_ID_LEN:
            problems.append(f"{file}: lora_id_format - ids of {len(last)} chars (cap {MAX_ID_LEN})")
    except (KeyError, IndexError, ValueError) as e:
        problems.append(
            f"{file}: lora_id_format - bad format string ({e!r}); fields are {{name}} and {{index}}"
        )


def _validate_builder(
    data: Mapping[str, Any], vary: Mapping[str, _Dist], file: str, problems: list[str]
) -> tuple[Any, BaseModel | None]:
    """The builder named by ``builder:``, its per-LoRA hyperparameters against ``vary:`` (with a
    close-match hint) and its own ``Config`` over the builder-facing sections."""
    from lora_zoo.build.registry import get_builder

    bname = data.get("builder")
    if not isinstance(bname, str):
        return None, None
    try:
        builder_cls = get_builder(bname)
    except (BuilderNotFoundError, BuildError) as e:
        problems.append(f"{file}: builder - {e.message}")
        return None, None
    known = known_hparams(builder_cls)
    for k in vary if known is not None else ():
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"{file}: vary.{k} - builder {bname!r} has no per-LoRA "
                f"hyperparameter {k!r}{hint} (known: {', '.join(sorted(known))})"
            )
    section_data = {s: data[s] for s in BUILDER_SECTIONS if data.get(s) is not None}
    try:
        config = builder_cls.Config.model_validate(section_data)
    except ValidationError as e:
        problems += _problems(e, section_data, "", file)
        return builder_cls, None
    check = getattr(builder_cls, "check_vary", None)  # cross-section rules of a builder
    if check is not None:
        problems += [f"{file}: vary.{k} - {msg}" for k, msg in check(config, sorted(vary))]
    return builder_cls, config


def validate(data: Mapping[str, Any], *, file: str = "<recipe>", text: str | None = None) -> Recipe:
    """Validate a resolved recipe dict (no ``include``); every problem in one RecipeError
    (torchtune's rule: a user fixes a recipe in one pass, not one error per run)."""
    problems: list[str] = _bounds(data, file)  # before anything is copied or allocated
    if problems:
        raise RecipeError(problems, file=file)
    data = copy.deepcopy(dict(data))
    if "include" in data:
        problems.append(f"{file}: include - includes must be resolved before validation")
    model: RecipeModel | None = None
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as e:
        problems += _problems(e, data, "", file)
    vary, count, size = _validate_dists(data, file, problems)
    _validate_id_format(data, file, problems)
    builder_cls, config = _validate_builder(data, vary, file, problems)
    if problems:
        raise RecipeError(problems, file=file)
    assert model is not None and config is not None and builder_cls is not None
    resolved = json.loads(json.dumps(data, default=str))  # plain JSON-able copy
    return Recipe(
        model=model,
        config=config,
        builder_cls=builder_cls,
        resolved=resolved,
        text=text if text is not None else yaml.safe_dump(resolved, sort_keys=False),
        file=file,
        vary=vary,
        subset_count=count,
        subset_size=size,
    )


def load_recipe_text(
    text: str,
    *,
    file: str = "<recipe>",
    base_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    allow_paths: Sequence[str | os.PathLike[str]] | None = None,
) -> Recipe:
    """Parse + include + override + validate recipe text (``file`` names it in errors).

    ``allow_paths`` marks the text as untrusted (a recipe stored in someone's zoo): then it may
    read no local path (includes, data paths, folders) outside those roots (``[]``: none)."""
    data = _safe_load(text, file)
    base = Path(base_dir) if base_dir is not None else None
    if allow_paths is not None:
        if problems := local_path_problems(data, file, allow_paths, base):
            raise RecipeError(problems, file=file)
    data = _resolve_includes(data, file, base, ())
    data = apply_overrides(data, overrides)
    return validate(data, file=file, text=text)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file; a bare name like ``quickstart`` falls back to the shipped recipes."""
    p = Path(path)
    if not p.is_file():
        name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
        if str(p) in (p.name, p.stem):
            try:
                res = resources.files("lora_zoo.recipes").joinpath(name)
                if res.is_file():
                    return load_recipe_text(
                        res.read_text(encoding="utf-8"),
                        file=f"lora_zoo.recipes/{name}",
                        overrides=overrides,
                    )
            except ModuleNotFoundError:  # pragma: no cover
                pass
        raise RecipeError([f"{path}: (file) - recipe file not found"], file=str(path))
    return load_recipe_text(
        p.read_text(encoding="utf-8"), file=str(p), base_dir=p.parent, overrides=overrides
    )
