"""Paper-scale zoos on one machine: write, pack, verify, read, push N synthetic LoRAs; one table.

Presets (float32 factors, PEFT layout):
  sd14   SD-1.4 UNet to_q / to_v, r = 4, 64 modules (attn1 + attn2 of 16 transformer blocks,
         widths 320 / 640 / 1280, text dim 768 for attn2.to_v): ~1.6 MB per LoRA
  llama3b  Llama-3.2-3B q_proj / v_proj, r = 8, 28 layers (56 modules; 3072 -> 3072 / 1024):
         ~9 MB per LoRA

For each N: (1) a build work dir of N finished LoRAs is written (what the runner leaves), (2)
``lora-zoo pack`` packs it in a child process whose peak RSS is measured (the streaming pack
must stay flat in N), (3) ``verify`` hashes every shard, (4) the ``factors`` and ``svals`` views
are read through ``LoraIterableDataset`` (batch 64), (5) optionally the zoo is pushed to the
Hub stand-in server of the tests (``--push``). Prints LoRAs/s, MB/s and peak RSS per step.

    python benchmarks/bench_scale.py --preset sd14 --n 1000 4000 10000
    python benchmarks/bench_scale.py --preset llama3b --n 1000        # ~9 GB per 1000 LoRAs
    python benchmarks/bench_scale.py --preset sd14 --n 1000 10000 --bench 5  # + streaming bench

``--bench EPOCHS``: every LoRA carries a planted label (``planted``: a seeded coin; true adds
one fixed direction to the first 4 modules' ΔW), and ``lora-zoo bench --stream`` trains GL-net on it in a
child process: peak RSS, and at the end its anonymous and file-backed parts (streaming reads
row groups without the shards' memory map, so neither part should grow with N: the file-backed
part is the Python / torch libraries plus the footers and small columns read through the map),
LoRAs/s per epoch, test AUROC against the permuted-labels control.

Disk: about twice the zoo size per N (work dir + zoo); the largest N the disk allows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def preset_shapes(name: str) -> list[tuple[str, int, int, int]]:
    """[(module name, in, out, r)] of a preset."""
    if name == "sd14":
        widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320,
                  320, 320]  # fmt: skip
        out = []
        for b, w in enumerate(widths):
            for attn, kv_in in (("attn1", w), ("attn2", 768)):
                base = f"unet.blocks.{b}.transformer_blocks.0.{attn}"
                out += [(f"{base}.to_q", w, w, 4), (f"{base}.to_v", kv_in, w, 4)]
        return out
    if name == "llama3b":
        return [
            (f"model.layers.{i}.self_attn.{p}", 3072, o, 8)
            for i in range(28)
            for p, o in (("q_proj", 3072), ("v_proj", 1024))
        ]
    raise SystemExit(f"unknown preset {name!r}")


def planted(i: int) -> bool:
    """The planted label of LoRA ``i``: a seeded coin (not a function of i's parity, so no
    split or row order can leak it)."""
    from lora_zoo.seeding import sub_seed

    return sub_seed(0, "planted", str(i)) % 2 == 1


def make_record(shapes, i: int):
    """Random factors; a LoRA whose planted label is true has, in its first 4 modules, rank slot
    0 replaced by one fixed direction u v^T (the same u, v for every such LoRA, at the noise's
    scale): a GL(r)-invariant signal in ΔW that GL-net's products W_u ΔW W_v^T carry as a
    constant shift (learnable by an invariant model, not by a constant), while every other
    module stays pure noise."""
    from lora_zoo.record import LoraModule, LoraRecord
    from lora_zoo.seeding import sub_seed

    g = torch.Generator().manual_seed(i)
    mods = {}
    for k, (n, fin, fout, r) in enumerate(shapes):
        a = torch.randn(r, fin, generator=g) * 0.02
        b = torch.randn(fout, r, generator=g) * 0.02
        if k < 4 and planted(i):
            d = torch.Generator().manual_seed(sub_seed(0, "planted_direction", n, bits=31))
            a[0] = torch.randn(fin, generator=d) * 0.04
            b[:, 0] = torch.randn(fout, generator=d) * 0.04
        mods[n] = LoraModule(a, b, float(2 * r), 2.0)
    r = shapes[0][3]
    cfg = {
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted({n.rsplit(".", 1)[1] for n, *_ in shapes}),
    }
    return LoraRecord(mods, cfg, f"syn-{i:06d}")


def write_work_dir(out: Path, shapes, n: int) -> tuple[float, int]:
    """A build work dir with ``n`` finished LoRAs, as the runner leaves it."""
    from lora_zoo.build.api import JobSpec, TrainedLora
    from lora_zoo.build.recipe import load_recipe
    from lora_zoo.build.registry import builder_info
    from lora_zoo.build.workdir import DONE, WorkDir, work_dir_for

    recipe = load_recipe("quickstart", [f"num_loras={n}", "output.split={kind: random}"])
    jobs = [JobSpec(index=i, lora_id=f"syn-{i:06d}", seeds={"init": i}, hparams={}, data={})
            for i in range(n)]  # fmt: skip
    wd = WorkDir(work_dir_for(out))
    wd.init(recipe, jobs, None, builder_info(recipe.builder), k=16, all_indices=list(range(n)))
    t0, nbytes = time.perf_counter(), 0
    for j in jobs:
        rec = make_record(shapes, j.index)
        weights = rec.to_safetensors_bytes()
        nbytes += len(weights)
        wd.write_result(TrainedLora(job=j, record=rec, metadata={"syn": j.index, "planted": planted(j.index)},
                                    scores={"score": float(j.index % 7)}), weights)  # fmt: skip
        wd.append(j.index, DONE, attempts=1, wall_time_s=0.0)
    return time.perf_counter() - t0, nbytes


def pack_child(work: Path, zoo: Path) -> tuple[float, int]:
    """``pack`` in a child process; (seconds, the child's own peak RSS in bytes).

    The peak is read by the child itself (``VmHWM``) after packing: ``RUSAGE_CHILDREN`` would
    also count the pages a forked child shares with this (large, by then) parent before exec."""
    code = (
        "import sys; from lora_zoo.build.pack import pack; "
        "pack([sys.argv[1]], sys.argv[2], progress=False); "
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')))"
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, str(work), str(zoo)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - t0, int(out.stdout.strip().splitlines()[-1])


def read_views(zoo: Path, view: str) -> float:
    from lora_zoo.load.datasets import LoraIterableDataset
    from lora_zoo.load.source import load_zoo

    z = load_zoo(zoo)
    t0 = time.perf_counter()
    for s in z.splits:
        for _batch in LoraIterableDataset(z[s], view=view, batch_size=64):
            pass
    return time.perf_counter() - t0


def bench_child(zoo: Path, epochs: int, repeats: int = 1) -> dict:
    """``lora-zoo bench --stream`` on the planted label in a child process: (seconds, the
    child's own peak RSS, LoRAs/s per epoch, test AUROC of GL-net and of its permuted-labels
    control). Streaming keeps one minibatch decoded, so the peak should not grow with N."""
    code = (
        "import sys, json, time; from lora_zoo.lol.bench import run_bench, TrainConfig; "
        "t=time.perf_counter(); r=run_bench(sys.argv[1], 'planted', models=['baseline','glnet'], "
        "repeats=int(sys.argv[3]), preset='small', progress=False, write=False, bootstrap=200, "
        "train=TrainConfig(stream=True, max_epochs=int(sys.argv[2]), patience=3, batch_size=16, lr=1e-3)); "
        "t=time.perf_counter()-t; "
        "g=[x for x in r['runs'] if x['model']=='glnet']; "
        "ep=sum(s['epochs'] for x in g for s in x['per_seed']); "
        "st={l.split(':')[0]: int(l.split()[1])*1024 for l in open('/proc/self/status') "
        "if l.startswith(('VmHWM', 'RssAnon', 'RssFile'))}; rss=st['VmHWM']; "
        "print(json.dumps({'s': t, 'rss': rss, 'anon': st['RssAnon'], 'file': st['RssFile'], "
        "'epochs': ep, 'n': r['n'], "
        "'auroc': g[0]['summary']['auroc'], 'control': g[1]['summary']['auroc'], "
        "'control_seeds': [s['metrics']['auroc'] for s in g[1]['per_seed']]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(zoo), str(epochs), str(repeats)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def push_hub(zoo: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from lora_zoo.remote.push import push
    from tests.fixtures.hub_server import LocalHub

    with LocalHub() as hub:
        os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_dummy", HF_HUB_DISABLE_XET="1")
        t0 = time.perf_counter()
        push(zoo, "bench/scale", progress=False)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="sd14", choices=("sd14", "llama3b"))
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--push", action="store_true", help="also push to the Hub stand-in")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument(
        "--bench",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also `lora-zoo bench --stream` GL-net on the planted label (at most EPOCHS epochs)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="--bench: seeds per model (the permuted-labels control's spread needs several)",
    )
    args = ap.parse_args()
    shapes = preset_shapes(args.preset)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-scale-"))
    rows, bench_rows = [], []
    for n in sorted(args.n):
        out = scratch / f"{args.preset}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        w_s, nbytes = write_work_dir(out / "work", shapes, n)
        p_s, rss = pack_child(out / "work", out / "zoo")
        from lora_zoo.zoo.manifest import verify

        t0 = time.perf_counter()
        assert verify(out / "zoo") == []
        v_s = time.perf_counter() - t0
        read_views(out / "zoo", "factors")  # warm-up: the same page-cache state for both views
        f_s = read_views(out / "zoo", "factors")
        s_s = read_views(out / "zoo", "svals")
        h_s = push_hub(out / "zoo") if args.push else float("nan")
        if args.bench:
            bench_rows.append((n, bench_child(out / "zoo", args.bench, args.repeats)))
        mb = nbytes / 1e6
        rows.append((n, mb / n, w_s, p_s, rss, v_s, f_s, s_s, h_s, mb))
        shutil.rmtree(out, ignore_errors=True)
    print(f"preset {args.preset}: {len(shapes)} modules; per LoRA {rows[0][1]:.2f} MB")
    print("| N | zoo GB | write LoRAs/s | pack LoRAs/s (MB/s) | pack peak RSS | verify MB/s | "
          "factors LoRAs/s | svals LoRAs/s | push MB/s |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, _per, w_s, p_s, rss, v_s, f_s, s_s, h_s, mb in rows:
        print(f"| {n} | {mb / 1e3:.2f} | {n / w_s:.0f} | {n / p_s:.0f} ({mb / p_s:.0f}) | "
              f"{rss / 2**30:.2f} GiB | {mb / v_s:.0f} | {n / f_s:.0f} | {n / s_s:.0f} | "
              f"{mb / h_s:.0f} |")  # fmt: skip
    if bench_rows:
        print_bench(bench_rows)
    print(json.dumps({"rows": rows, "bench": bench_rows}))


def print_bench(bench_rows: list) -> None:
    """The streaming bench table: one row per N."""
    print("| N | bench s | peak RSS | at the end: anonymous / file-backed | "
          "LoRAs/s per epoch | GL-net AUROC [95% CI] | permuted |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, b in bench_rows:
        reads = b["epochs"] * 2 * (b["n"]["fit"] + b["n"]["valid"])  # train + validation pass
        a, c = b["auroc"], b["control"]
        print(f"| {n} | {b['s']:.0f} | {b['rss'] / 2**30:.2f} GiB | {b['anon'] / 2**30:.2f} / "
              f"{b['file'] / 2**30:.2f} GiB | {reads / b['s']:.0f} | "
              f"{a['mean']:.3f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] | {c['mean']:.3f}"
              f"{seeds(b.get('control_seeds', []))} |")  # fmt: skip


def seeds(values: list[float]) -> str:
    """The control's per-seed values when there are several: a permuted-labels model can
    still split two sharp clusters, in a random direction per seed, so its spread is what a
    reader compares against, not its mean."""
    return f" (seeds: {' / '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""


if __name__ == "__main__":
    main()
