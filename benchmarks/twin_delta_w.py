"""How far apart are the same LoRAs on two bases? For transfer twins (README "Transfer.").

Twin zoos plan the same jobs (same seeds, images, LoRA init; only the base differs), so LoRA i
of one zoo and LoRA i of the other are the same training run on two bases. This prints, per
other zoo, the cosine between the two runs' dense ΔW (all modules concatenated, in name order),
the same with each zoo's mean ΔW removed (the job-specific part a membership model needs), and
the ratio of their norms; beside it, the mean cosine between different jobs of the first zoo
(the shared component's scale). A cosine near 1 means a model trained on one zoo reads the other
zoo's LoRAs as it read its own; near the different-jobs figure, it sees other LoRAs.

    python benchmarks/twin_delta_w.py t2i-quickstart-zoo t2i-sd15-twin-zoo [more twins ...]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from lora_zoo import load_zoo


def delta_ws(path: str) -> dict[int, torch.Tensor]:
    """Job index (the lora_id's trailing number) -> flat float64 ΔW over every module."""
    zoo = load_zoo(path)
    out: dict[int, torch.Tensor] = {}
    for split in zoo.splits:
        s = zoo[split]
        for i in range(len(s)):
            rec = s.record(i)
            flat = [m.delta_w().flatten().double() for _, m in sorted(rec.modules.items())]
            out[int(s.ids[i].rsplit("-", 1)[1])] = torch.cat(flat)
    return out


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("zoo", help="the zoo a model trains on")
    ap.add_argument("twins", nargs="+", help="twin zoos planned from the same jobs")
    args = ap.parse_args()
    a = delta_ws(args.zoo)
    mean_a = sum(a.values()) / len(a)
    print("| twin | jobs | same-job cos | min..max | centred cos | norm ratio twin/first |")
    print("|---|---:|---:|---:|---:|---:|")
    for twin in args.twins:
        b = delta_ws(twin)
        mean_b = sum(b.values()) / len(b)
        both = sorted(set(a) & set(b))
        cos = [_cos(a[i], b[i]) for i in both]
        centred = [_cos(a[i] - mean_a, b[i] - mean_b) for i in both]
        ratio = [float(b[i].norm() / a[i].norm()) for i in both]
        print(
            f"| {twin} | {len(both)} | {_mean(cos):.3f} | {min(cos):.3f}..{max(cos):.3f} "
            f"| {_mean(centred):.3f} | {_mean(ratio):.3f} |"
        )
    keys = sorted(a)[:40]
    pairs = [_cos(a[i], a[j]) for i, j in itertools.combinations(keys, 2)]
    print(f"\ndifferent jobs of {args.zoo} (first {len(keys)}): mean cos {_mean(pairs):.3f}")


if __name__ == "__main__":
    main()
