"""The memory estimate (lora_zoo/engine/memory.py) against what the CPU allocator really held.

Measured in a fresh subprocess per K: the peak resident set (``VmHWM``, reset just before) during one
training step minus the resident set just before it. ``MALLOC_MMAP_THRESHOLD_`` pins glibc's
mmap threshold (64 KiB) so every tensor of the pass is its own mapping, returned to the OS on
free: the resident set then follows live tensor memory instead of a heap high-water mark.

Stated factor: measured / estimated within [1/2, 2]. Why that wide: the estimate counts what
autograd saves and one gradient transient; the allocator also holds short-lived temporaries of
single kernels (attention scores, softmax, the cross-entropy's float copies), rounds every
mapping to pages, and the step itself allocates AdamW state on its first call (counted in
``lora_state``). A wrong K scaling, a missed term of the size of the activations, or counting
the frozen base weights as activations are each off by more than 2x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from lora_zoo.builders.causal_lm.losses import causal_lm_losses
from lora_zoo.engine import LoraSpec, MultiLoraModel, MultiLoraTrainer, TrainHParams, memory
from tests.fixtures.models import tiny_llama

k, b, t = int(sys.argv[1]), 8, 96
model = tiny_llama(seed=0, vocab=512, hidden=256, layers=2)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
mm = MultiLoraModel(model, targets, [LoraSpec(r=8, alpha=16, init_seed=i) for i in range(k)])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 512, (k * b, t), generator=g)  # (K*b, T)
one = ids[:: b][:k]  # one row per LoRA (K, T)

def run_one_row():
    return causal_lm_losses(model(input_ids=one).logits, one, k).sum()

est = memory.estimate(model, list(mm.wrappers.values()), k=k, rows=b, r=8,
                      run_one_row=run_one_row)
est = memory.MemoryEstimate(est.k, est.rows, est.base, est.lora_state,
                            est.per_row // k, est.transient // k)
for p in mm.parameters():
    p.grad = None
trainer = MultiLoraTrainer(mm, [TrainHParams(lr=1e-3, total_steps=5) for _ in range(k)])
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

# reset the peak (VmHWM) to the current RSS, so the peak is the training step's alone and not
# whatever imports or the estimate's own probe reached before (Linux >= 4.0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
trainer.step(lambda: causal_lm_losses(model(input_ids=ids).logits, ids, k))
peak = status("VmHWM:")
print(json.dumps({"est": est.total - est.base, "measured": peak - before,
                  "per_row": est.per_row, "base": est.base}))
"""


def _measure(k: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(k)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_estimate_within_factor_two_of_cpu_allocator():
    for k in (1, 4):
        m = _measure(k)
        ratio = m["measured"] / m["est"]
        assert 0.5 <= ratio <= 2.0, (k, m, ratio)


def test_estimate_excludes_frozen_weights_and_scales_with_k():
    """No subprocess: the probe must not count the frozen base (a tied lm_head saves the
    embedding for the input gradient) and the K terms scale linearly."""
    import torch

    from lora_zoo.builders.causal_lm.losses import causal_lm_losses
    from lora_zoo.engine import LoraSpec, MultiLoraModel, memory
    from tests.fixtures.models import tiny_llama

    model = tiny_llama(seed=0, vocab=4096, hidden=64, layers=1)  # base dominated by the vocab
    mm = MultiLoraModel(model, ["q_proj", "v_proj"], [LoraSpec(r=4, init_seed=0)])
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    est = memory.estimate(
        model,
        list(mm.wrappers.values()),
        k=1,
        rows=1,
        r=4,
        run_one_row=lambda: causal_lm_losses(model(input_ids=ids).logits, ids, 1).sum(),
    )
    emb = model.get_input_embeddings().weight
    assert est.per_row < emb.numel() * emb.element_size()  # activations of 8 tokens, not 4 MiB
    assert est.base >= emb.numel() * emb.element_size()
    e4 = est.at(4)
    assert e4.total - e4.base == 4 * (est.total - est.base)
