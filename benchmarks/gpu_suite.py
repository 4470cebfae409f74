"""Every GPU benchmark in one command, one report: the day a GPU machine is lent, run

    python benchmarks/gpu_suite.py --out gpu-suite          # < 8 min on one datacenter GPU

and paste ``gpu-suite/REPORT.md`` into README. Rows:

  llm     engine vs resident PEFT on the Qwen2-0.5B architecture (random weights, bf16, r=4
          q/v), K = 1, 8, 32 (benchmarks/bench_build.py --model qwen2-0.5b-config)
  t2i     SD-1.4 UNet (random weights, 512 px) engine vs resident PEFT, K = 1, 4, 8
          (benchmarks/bench_t2i.py --unet sd14-config)
  loading the loaders with --device cuda (benchmarks/bench_loading.py)
  lol     a small quickstart zoo built on the device, then ``lora-zoo bench --device cuda``

``--smoke`` runs the same code, in the same order, on CPU at tiny sizes (the tiny Llama and
UNet, a few LoRAs and steps): ``tests/test_gpu_suite.py`` runs it in CI so the suite cannot
rot. Each benchmark is its own subprocess (a crash or an OOM in one leaves the others); the
report holds one summary table (benchmark, command, exit status, wall seconds) and each
benchmark's own table below it.

Carrying it to a GPU machine without internet: see docs/GPU.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def plan(smoke: bool, device: str, work: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of each benchmark, full size on ``device`` or tiny on CPU."""
    b = str(REPO / "benchmarks")
    if smoke:
        llm = ["--model", "tiny", "--ks", "1,2", "--loras", "2", "--fresh-loras", "1"]
        llm += ["--steps", "2", "--batch", "2", "--seq", "16"]
        t2i = ["--unet", "tiny", "--ks", "1,2", "--steps", "2", "--eval-steps", "1"]
        t2i += ["--prompts", "1", "--paper-loras", "1", "--resident-loras", "2"]
        load = ["--n", "16", "--batch-size", "8", "--skip-svd"]
        zoo = ["--limit", "8", "--set", "base_model.pretrain_steps=5", "--set", "train.steps=2"]
        zoo += ["--set", "train.k=4"]
        lol = ["--repeats", "1", "--models", "baseline", "mlp"]
    else:
        llm = ["--model", "qwen2-0.5b-config", "--ks", "1,8,32", "--loras", "32"]
        llm += ["--fresh-loras", "1", "--steps", "10", "--batch", "8", "--seq", "256"]
        t2i = ["--unet", "sd14-config", "--ks", "1,4,8", "--steps", "10", "--eval-steps", "10"]
        t2i += ["--prompts", "2", "--paper-loras", "1", "--resident-loras", "4"]
        load = ["--n", "256"]
        zoo = ["--set", "train.k=32"]
        lol = ["--repeats", "3"]
    dev = ["--device", device]
    zoo_dir = str(work / "lol-zoo")
    cli = [PY, "-m", "lora_zoo"]
    return [
        ("llm", [PY, f"{b}/bench_build.py", *llm, *dev]),
        ("t2i", [PY, f"{b}/bench_t2i.py", *t2i, "--cache", str(work / "t2i-cache"), *dev]),
        ("loading", [PY, f"{b}/bench_loading.py", *load, *dev]),
        ("lol-build", [*cli, "build", "quickstart", "--out", zoo_dir, "--no-progress", *zoo, *dev]),
        ("lol", [*cli, "bench", zoo_dir, "--target", "in_group.*", *lol, *dev]),
    ]


def run_suite(out: Path, *, smoke: bool, device: str, timeout: float) -> list[dict]:
    """Run every benchmark, write ``out/REPORT.md`` and return the summary rows."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows, sections = [], []
    for name, argv in plan(smoke, device, out):
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                argv, capture_output=True, text=True, env=env, cwd=out, timeout=timeout
            )
            rc, text = p.returncode, p.stdout + ("" if p.returncode == 0 else p.stderr[-3000:])
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
        wall = time.perf_counter() - t0
        shown = " ".join(a if a != PY else "python" for a in argv).replace(str(REPO) + "/", "")
        rows.append({"benchmark": name, "command": shown, "rc": rc, "wall_s": round(wall, 1)})
        sections.append(f"## {name} (exit {rc}, {wall:.0f} s)\n\n```\n{text.strip()}\n```\n")
        print(f"{name}: exit {rc}, {wall:.0f} s", flush=True)
    head = [
        f"# GPU suite ({'smoke, CPU, tiny sizes' if smoke else device})",
        "",
        "| benchmark | exit | wall s | command |",
        "|---|---:|---:|---|",
        *[f"| {r['benchmark']} | {r['rc']} | {r['wall_s']} | `{r['command']}` |" for r in rows],
        "",
    ]
    (out / "REPORT.md").write_text("\n".join(head) + "\n" + "\n".join(sections))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-suite", help="folder for REPORT.md and scratch")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (ignored with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="same code on CPU, tiny sizes")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per benchmark")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else args.device
    rows = run_suite(
        Path(args.out).resolve(), smoke=args.smoke, device=device, timeout=args.timeout
    )
    print((Path(args.out) / "REPORT.md").read_text().split("\n## ")[0])
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
