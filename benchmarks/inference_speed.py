"""Inference latency of dense models vs their ``sparse-cpu`` export, interleaved in one process.

For each model and sparsity, random uniform masks are drawn (``st.sparsify(method="static")``);
for each batch size the model is exported with ``batch_size`` set to that batch (the exporter
times every sparse Linear there and keeps the slower ones dense), then the masked dense model and
the export alternate round by round. Reported: median latency, throughput, and the median over
rounds of the paired ratio dense time / sparse time (above 1: the export is faster).

    python benchmarks/inference_speed.py                  # full grid, a few minutes on 2 cores
    python benchmarks/inference_speed.py --quick          # batches 1/64, 90% and 98% only
    python benchmarks/inference_speed.py --threads 1      # pin intra-op threads
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from _common import cpu_name
from torch import nn

import sparsetrain as st
from sparsetrain.export import bake, export_model
from sparsetrain.export.timing import compare
from sparsetrain.models import build_model

MODELS = {"mlp": "LeNet-300-100", "small_cnn": "small CNN", "mlp_4096": "MLP 784-4096-4096-10"}
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
BATCHES = (1, 8, 64, 256)
INPUT_SHAPE = (1, 28, 28)
ROOT = Path(__file__).resolve().parents[1]


def _sparse_model(name: str, sparsity: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, image_size=28).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = st.sparsify(model, opt, method="static", sparsity=sparsity, seed=0)
    sp.detach()
    return model, sp.masks


def measure(name: str, sparsity: float, batches: tuple[int, ...], rounds: int) -> list[dict]:
    """One row per batch size: latencies, throughputs, speed-up and the exporter's choices."""
    model, masks = _sparse_model(name, sparsity)
    dense = bake(model, masks)
    check = torch.randn(8, *INPUT_SHAPE)
    rows = []
    for batch in batches:
        sparse = export_model(
            model, masks, "sparse-cpu", example_input=check, batch_size=batch, rounds=rounds
        ).eval()
        x = torch.randn(batch, *INPUT_SHAPE)
        timing = compare(partial(dense, x), partial(sparse, x), rounds=rounds, min_round_s=0.01)
        decisions = sparse.export_decisions.values()
        rows.append(
            {
                "model": name,
                "sparsity": sparsity,
                "batch": batch,
                "dense_ms": timing.baseline_s * 1e3,
                "sparse_ms": timing.candidate_s * 1e3,
                "dense_per_s": batch / timing.baseline_s,
                "sparse_per_s": batch / timing.candidate_s,
                "speedup": timing.speedup,
                "speedup_best_rounds": timing.best_speedup,
                "sparse_layers": [d.layer for d in decisions if d.choice == "sparse"],
                "layer_speedups": {d.layer: d.speedup for d in decisions if d.speedup},
            }
        )
        print(
            f"{name:>10} {sparsity:4.0%} batch {batch:>3}: dense {rows[-1]['dense_ms']:8.3f} ms  "
            f"sparse {rows[-1]['sparse_ms']:8.3f} ms  x{timing.speedup:5.2f}  "
            f"CSR layers: {', '.join(rows[-1]['sparse_layers']) or '-'}",
            flush=True,
        )
    return rows


def table(rows: list[dict], batches: tuple[int, ...]) -> str:
    """Markdown table of speed-ups (dense time / sparse-cpu time), one row per model and sparsity."""
    head = "| model | sparsity | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = [head, "|---|---|" + "---|" * len(batches)]
    keys = dict.fromkeys((r["model"], r["sparsity"]) for r in rows)
    for model, sparsity in keys:
        cells = {r["batch"]: r for r in rows if (r["model"], r["sparsity"]) == (model, sparsity)}
        ratios = [f"{cells[b]['speedup']:.2f}x" if b in cells else "-" for b in batches]
        lines.append(f"| {MODELS[model]} | {sparsity:.0%} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], batches: tuple[int, ...], path: Path) -> None:
    """Speed-up vs sparsity, one panel per batch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3.2), sharey=True)
    for ax, batch in zip(axes if len(batches) > 1 else [axes], batches, strict=True):
        for model, label in MODELS.items():
            pts = sorted(
                (r["sparsity"], r["speedup"])
                for r in rows
                if r["model"] == model and r["batch"] == batch
            )
            if pts:
                ax.plot([100 * s for s, _ in pts], [v for _, v in pts], "o-", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20, 50]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3, which="both")
    axes_list = axes if len(batches) > 1 else [axes]
    axes_list[0].set_ylabel("speed-up over dense")
    axes_list[0].legend(fontsize=8)
    threads = torch.get_num_threads()
    fig.suptitle(
        f"sparse-cpu export vs dense, CPU inference ({threads} thread{'s' * (threads > 1)})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="batches 1/64, 90%% and 98%%, 3 rounds"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/inference_speed.json"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/figures/inference_speedup.png")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds (default 7, quick 3)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = (1, 64) if args.quick else BATCHES
    sparsities = (0.9, 0.98) if args.quick else SPARSITIES
    rounds = args.rounds or (3 if args.quick else 7)

    load_before, start = os.getloadavg(), time.perf_counter()
    rows = [
        row
        for name in args.models
        for sparsity in sparsities
        for row in measure(name, sparsity, batches, rounds)
    ]
    result = {
        "command": " ".join(["python", "benchmarks/inference_speed.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    print("\nSpeed-up of the sparse-cpu export over dense (median of paired rounds):")
    print(table(rows, batches))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, batches, args.plot)
    print(f"\nwrote {args.out} and {args.plot} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
