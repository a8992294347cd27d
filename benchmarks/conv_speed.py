"""Convolutions on the compiled sparse kernels vs oneDNN's dense ones, interleaved in one process.

Two parts, both seeded with random uniform masks:

* **Whole training steps.** Copies of the same model train side by side with
  ``st.sparsify(..., method="static", kernels=K)`` for K in dense / sparse / auto (SGD, momentum
  0.9, weight decay 5e-4; loss, backward and optimizer step with the sparsifier's hooks timed).
  Each round runs a block of steps of every variant in turn, order reversed on odd rounds;
  reported are medians over rounds of the per-step times and of the paired ratios dense /
  variant (above 1: faster than dense). Models: ``conv_net``, three Conv2d(64, 64, 3,
  padding=1) + ReLU on 32x32 maps, batch 32, then pooling and a Linear classifier; and
  ``resnet20`` on 28x28 one-channel inputs, batch 128.
* **Per layer.** One convolution of each kind in those models, forward (``F.conv2d`` against
  the sparse forward) and backward (input and weight gradients: ``convolution_backward``
  against the sparse backward, gradient written into reused storage as in training), timed in
  paired rounds under ``torch.inference_mode``.

    python benchmarks/conv_speed.py --threads 1 --out benchmarks/results/conv_speed_1thread.json
    python benchmarks/conv_speed.py --quick                 # fewer rounds and sparsities
    python benchmarks/conv_speed.py --figure benchmarks/results/conv_speed_1thread.json \
        benchmarks/results/conv_speed_2threads.json       # the figure from saved runs
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_name
from torch import nn

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.kernels import ConvGeometry, ConvStructure, GradBuffer, Workspace, conv_kernels
from sparsetrain.kernels.sparse_conv import sparse_conv_backward, sparse_conv_forward
from sparsetrain.models import build_model

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("dense", "sparse", "auto")
MODELS = {
    "conv_net": ("3x Conv2d 64->64 3x3 on 32x32, batch 32", 32, (64, 32, 32), (0.95,)),
    "resnet20": ("ResNet-20 on 28x28x1, batch 128", 128, (1, 28, 28), (0.9, 0.95)),
}
# (label, in, out, kernel, stride, input side, batch, needs grad_input)
LAYERS = (
    ("conv net: 64->64 3x3, 32x32, batch 32", 64, 64, 3, 1, 32, 32, True),
    ("ResNet-20 stage 1: 16->16 3x3, 28x28", 16, 16, 3, 1, 28, 128, True),
    ("ResNet-20 stage 2: 32->32 3x3, 14x14", 32, 32, 3, 1, 14, 128, True),
    ("ResNet-20 stage 3: 64->64 3x3, 7x7", 64, 64, 3, 1, 7, 128, True),
    ("ResNet-20 down: 16->32 3x3 stride 2, 28x28", 16, 32, 3, 2, 28, 128, True),
    ("ResNet-20 shortcut: 16->32 1x1 stride 2, 28x28", 16, 32, 1, 2, 28, 128, True),
    ("ResNet-20 stem: 1->16 3x3, 28x28 (no grad_input)", 1, 16, 3, 1, 28, 128, False),
)
LAYER_SPARSITIES = (0.8, 0.9, 0.95, 0.98)


class ConvNet(nn.Module):
    """Three 3x3 convolutions of 64 channels: a step that is nearly all convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(m for _ in range(3) for m in (nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()))
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).mean((2, 3)))


def _model(name: str) -> nn.Module:
    if name == "conv_net":
        return ConvNet()
    return build_model(name, in_channels=1, num_classes=10, image_size=28)


def _timed(fn: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _paired(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1) -> dict:
    """Seconds per call of each, interleaved round by round (order reversed on odd rounds)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in list(fns) if r % 2 == 0 else list(reversed(fns)):
            times[k].append(_timed(fns[k], calls))
    return times


def _ratio(base: list[float], other: list[float]) -> float:
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


def whole_step(model_name: str, sparsity: float, rounds: int, steps: int) -> dict:
    """Per-step times of dense, sparse and auto copies of one model."""
    label, batch, shape, _ = MODELS[model_name]
    torch.manual_seed(0)
    base = _model(model_name)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    steps_of: dict[str, Callable[[], None]] = {}
    sparsifiers = {}
    for kernels in KERNELS:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sp = st.sparsify(model, opt, method="static", sparsity=sparsity, seed=0, kernels=kernels)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps_of[kernels], sparsifiers[kernels] = step, sp
    for step in steps_of.values():  # warm-up; auto times its layers here, once per case
        step()
        step()
    times = _paired(steps_of, rounds, steps)
    row = {"model": model_name, "label": label, "sparsity": sparsity, "batch": batch}
    for k in KERNELS:
        row[f"{k}_step_ms"] = 1e3 * statistics.median(times[k])
        if k != "dense":
            row[f"{k}_speedup"] = _ratio(times["dense"], times[k])
            row[f"{k}_layers"] = sparsifiers[k].kernels.choices()
    print(
        f"{model_name:>9} {sparsity:4.0%}: dense {row['dense_step_ms']:7.1f} ms, sparse "
        f"{row['sparse_step_ms']:7.1f} ms (x{row['sparse_speedup']:.2f}), auto "
        f"{row['auto_step_ms']:7.1f} ms (x{row['auto_speedup']:.2f})",
        flush=True,
    )
    return row


def layer(spec: tuple, sparsity: float, rounds: int) -> dict:
    """Forward and backward of one convolution, dense vs sparse."""
    label, cin, cout, k, stride, side, batch, grad_input = spec
    torch.manual_seed(0)
    numel = cout * cin * k * k
    mask = mask_ops.random_mask(
        (cout, cin, k, k), mask_ops.n_keep(numel, sparsity), torch.Generator().manual_seed(0)
    )
    w = torch.randn(cout, cin, k, k) * mask
    x = torch.randn(batch, cin, side, side)
    pad = k // 2
    g = ConvGeometry((stride, stride), (1, 1), (pad,) * 4)
    gy = torch.randn(batch, cout, *g.output_size(side, side, (k, k)))
    kernels = conv_kernels()
    start = time.perf_counter()
    s = ConvStructure.from_mask(mask)
    build_ms = 1e3 * (time.perf_counter() - start)
    ws, ticks = Workspace(), itertools.count()
    buffer = GradBuffer(lambda: next(ticks))
    output_mask = [grad_input, True, False]

    def dense_fwd() -> None:
        F.conv2d(x, w, None, stride, pad)

    def dense_bwd() -> None:
        torch.ops.aten.convolution_backward(
            gy, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, output_mask
        )

    def sparse_fwd() -> None:
        sparse_conv_forward(kernels, x, s.gather(w), None, s, g, ws)

    def sparse_bwd() -> None:
        _, values = sparse_conv_backward(kernels, gy, x, s.gather(w), s, g, grad_input, True, ws)
        buffer.fill(values, s)

    with torch.inference_mode():
        fns = {"dense_fwd": dense_fwd, "sparse_fwd": sparse_fwd}
        fns |= {"dense_bwd": dense_bwd, "sparse_bwd": sparse_bwd}
        for fn in fns.values():
            fn()
        calls = max(1, round(0.02 / max(_timed(dense_fwd), 1e-6)))
        times = _paired(fns, rounds, calls)
    both = {
        k: [f + b for f, b in zip(times[f"{k}_fwd"], times[f"{k}_bwd"], strict=True)]
        for k in ("dense", "sparse")
    }
    row = {"layer": label, "sparsity": sparsity, "structure_build_ms": build_ms}
    row |= {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
    row["forward_speedup"] = _ratio(times["dense_fwd"], times["sparse_fwd"])
    row["backward_speedup"] = _ratio(times["dense_bwd"], times["sparse_bwd"])
    row["speedup"] = _ratio(both["dense"], both["sparse"])
    print(
        f"{label:<50} {sparsity:4.0%}: fwd {row['dense_fwd_ms']:6.2f} / {row['sparse_fwd_ms']:6.2f}"
        f" ms (x{row['forward_speedup']:.2f}), bwd {row['dense_bwd_ms']:6.2f} / "
        f"{row['sparse_bwd_ms']:6.2f} ms (x{row['backward_speedup']:.2f}), both "
        f"x{row['speedup']:.2f}",
        flush=True,
    )
    return row


def tables(result: dict) -> str:
    """Markdown tables of one run."""
    lines = [
        "| model | sparsity | dense step | sparse step | sparse | auto step | auto |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        lines.append(
            f"| {r['label']} | {r['sparsity']:.0%} | {r['dense_step_ms']:.1f} ms "
            f"| {r['sparse_step_ms']:.1f} ms | {r['sparse_speedup']:.2f}x "
            f"| {r['auto_step_ms']:.1f} ms | {r['auto_speedup']:.2f}x |"
        )
    lines += [
        "",
        "| layer | sparsity | dense fwd | sparse fwd | fwd | dense bwd | sparse bwd | bwd "
        "| fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['layer']} | {r['sparsity']:.0%} | {r['dense_fwd_ms']:.2f} ms "
            f"| {r['sparse_fwd_ms']:.2f} ms | {r['forward_speedup']:.2f}x "
            f"| {r['dense_bwd_ms']:.2f} ms | {r['sparse_bwd_ms']:.2f} ms "
            f"| {r['backward_speedup']:.2f}x | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def figure(paths: list[Path], out: Path) -> None:
    """Forward+backward speed-up vs sparsity per layer kind, one panel per saved run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 5.4), squeeze=False)
    ticks = [0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32]
    for ax, result in zip(axes[0], results, strict=True):
        labels = list(dict.fromkeys(r["layer"] for r in result["layers"]))
        top, bottom = 1.0, 1.0
        for i, label in enumerate(labels):
            pts = [r for r in result["layers"] if r["layer"] == label]
            pts.sort(key=lambda r: r["sparsity"])
            xs = [100 * r["sparsity"] for r in pts]
            ys = [r["speedup"] for r in pts]
            ax.plot(xs, ys, "o-" if i < 4 else "s--", ms=4, label=label)
            top, bottom = max(top, *ys), min(bottom, *ys)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.axhspan(0.85, 1.15, color="gray", alpha=0.15, lw=0)
        ax.set_yscale("log", base=2)
        low = min(0.5, 0.8 * bottom)
        shown = [t for t in ticks if low <= t <= 2 * top]
        ax.set_yticks(shown, [f"{t:g}x" for t in shown])
        ax.set_ylim(low, 2 * top)
        ax.set_xticks([100 * s for s in LAYER_SPARSITIES])
        ax.set_xlabel("sparsity (%)")
        ax.set_title(f"{result['threads']} thread{'s' * (result['threads'] > 1)}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("forward+backward speed-up over oneDNN (log scale)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        "Sparse convolution kernels vs dense, per layer\n(CPU, median of paired rounds;"
        " gray band: ties)"
    )
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 90%% and 98%% per layer")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/conv_speed.json")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7, quick 3)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per block")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip-steps", action="store_true", help="per-layer timings only")
    parser.add_argument(
        "--figure", nargs="+", type=Path, default=None, help="draw the figure from saved runs"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/figures/conv_speedup.png")
    args = parser.parse_args(argv)
    if args.figure:
        figure(args.figure, args.plot)
        print(f"wrote {args.plot}")
        return
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if conv_kernels() is None:
        sys.exit("the sparse convolution extension is not available: nothing to measure")
    rounds = args.rounds or (3 if args.quick else 7)
    sparsities = (0.9, 0.98) if args.quick else LAYER_SPARSITIES
    load_before, start = os.getloadavg(), time.perf_counter()
    steps = []
    if not args.skip_steps:
        steps = [
            whole_step(m, s, rounds, args.steps) for m, spec in MODELS.items() for s in spec[3]
        ]
    layers = [layer(spec, s, rounds) for spec in LAYERS for s in sparsities]
    result = {
        "command": " ".join(["python", "benchmarks/conv_speed.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_block": args.steps,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "steps": steps,
        "layers": layers,
    }
    print("\n" + tables(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
