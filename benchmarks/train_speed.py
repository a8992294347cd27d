"""Whole training-step time on sparse kernels vs dense layers, interleaved in one process.

For each model and sparsity three copies of the same seeded model train side by side with
``st.sparsify(..., method="static", kernels=K)`` for K in dense / sparse / auto (SGD, momentum
0.9, weight decay 5e-4, batch 128; the loss, backward and optimizer step with the sparsifier's
hooks are all timed). Each round runs a block of steps of every variant in turn (order reversed
on odd rounds), then one *mask-update step* of each: 30% of every layer's active weights are
dropped by magnitude and as many grown at random through ``sp.set_masks`` (SET/RigL-like), and
the step that follows computes dense weight gradients, as RigL's update steps do; sparse
structures are rebuilt in it. With updates every 100 steps a step costs on average
``step + (update step - step) / 100``. Reported: medians over rounds of per-step times and of the
paired ratios dense / variant (above 1: faster than dense). A small probe also times one
convolution (the small CNN's 32->64 3x3) dense vs im2col + CSR, forward and backward.

    python benchmarks/train_speed.py               # MLP-4096 and small CNN, 80-98%: a few minutes
    python benchmarks/train_speed.py --quick       # 90% and 98%, fewer rounds: under a minute
    python benchmarks/train_speed.py --threads 1   # pin intra-op threads (busy machine)
    python benchmarks/train_speed.py --fused       # SGD(fused=True) in every variant
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_name
from torch import nn

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.kernels import LinearStructure
from sparsetrain.kernels.sparse_linear import (
    sparse_grad_input,
    sparse_grad_weight,
    sparse_linear_forward,
)
from sparsetrain.models import build_model

MODELS = {"mlp_4096": "MLP 784-4096-4096-10", "small_cnn": "small CNN"}
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
KERNELS = ("dense", "sparse", "auto")
UPDATE_EVERY = 100
DROP_FRACTION = 0.3
BATCH = 128
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Variant:
    """One model training under one kernel mode."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sp: st.Sparsifier
    x: torch.Tensor
    y: torch.Tensor

    def step(self) -> None:
        self.opt.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()

    def update_step(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks, then a step with dense weight gradients (RigL-like)."""
        self.sp.set_masks(masks)
        if self.sp.kernels is None:
            self.step()
        else:
            with self.sp.kernels.dense_gradients():
                self.step()


def drop_grow(sp: st.Sparsifier, update: int) -> dict[str, torch.Tensor]:
    """SET-like new masks: drop 30% of each layer's active weights by magnitude, regrow as many
    at random (the same masks go to every variant, so they stay comparable)."""
    masks = {}
    for name, param in sp.params.items():
        mask = sp.mask(name)
        active = int(mask.sum())
        if active in (0, mask.numel()):
            continue
        kept = mask_ops.drop_lowest(param.detach().abs(), mask, int(DROP_FRACTION * active))
        score = torch.rand(mask.shape, generator=mask_ops.generator_for(0, name, update))
        masks[name] = mask_ops.grow_highest(score, kept, active - int(kept.sum()))
    return masks


def _variants(model_name: str, sparsity: float, fused: bool) -> dict[str, Variant]:
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=1, num_classes=10, image_size=28)
    x = torch.randn(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))
    out = {}
    for kernels in KERNELS:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=fused or None
        )
        sp = st.sparsify(model, opt, method="static", sparsity=sparsity, seed=0, kernels=kernels)
        out[kernels] = Variant(model, opt, sp, x, y)
    return out


def _timed(fn: Callable[[], None], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _median_ratio(base: list[float], other: list[float]) -> float:
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


def measure(model_name: str, sparsity: float, rounds: int, steps: int, fused: bool) -> dict:
    """Step and update-step times of every kernel mode, interleaved round by round."""
    variants = _variants(model_name, sparsity, fused)
    for v in variants.values():  # warm-up; auto times its layers here, once per case
        v.step()
        v.step()
    rebuilds_before = {k: _rebuilds(v) for k, v in variants.items()}
    step_s: dict[str, list[float]] = {k: [] for k in variants}
    update_s: dict[str, list[float]] = {k: [] for k in variants}
    select_s: list[float] = []
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            step_s[k].append(_timed(variants[k].step, steps))
        start = time.perf_counter()
        masks = drop_grow(variants["dense"].sp, r + 1)
        select_s.append(time.perf_counter() - start)
        for k in order:
            update_s[k].append(_timed(partial(variants[k].update_step, masks)))
    amortized = {
        k: [
            s + (m + u - s) / UPDATE_EVERY
            for s, u, m in zip(step_s[k], update_s[k], select_s, strict=True)
        ]
        for k in variants
    }
    row: dict = {
        "model": model_name,
        "sparsity": sparsity,
        "batch": BATCH,
        "mask_selection_ms": 1e3 * statistics.median(select_s),
    }
    for k, v in variants.items():
        row[f"{k}_step_ms"] = 1e3 * statistics.median(step_s[k])
        row[f"{k}_update_step_ms"] = 1e3 * statistics.median(update_s[k])
        if k != "dense":
            row[f"{k}_speedup"] = _median_ratio(step_s["dense"], step_s[k])
            row[f"{k}_speedup_with_updates"] = _median_ratio(amortized["dense"], amortized[k])
            built, seconds = _rebuilds(v)
            row[f"{k}_rebuilds"] = built - rebuilds_before[k][0]
            row[f"{k}_rebuild_ms_per_update"] = 1e3 * (seconds - rebuilds_before[k][1]) / rounds
            row[f"{k}_layers"] = v.sp.kernels.choices()
    print(
        f"{model_name:>9} {sparsity:4.0%}: dense {row['dense_step_ms']:7.1f} ms  "
        f"sparse {row['sparse_step_ms']:7.1f} ms  x{row['sparse_speedup']:.2f} "
        f"(x{row['sparse_speedup_with_updates']:.2f} with updates)  "
        f"auto x{row['auto_speedup']:.2f} (x{row['auto_speedup_with_updates']:.2f})  "
        f"update: selection {row['mask_selection_ms']:.0f} ms, step dense "
        f"{row['dense_update_step_ms']:.0f} / sparse {row['sparse_update_step_ms']:.0f} ms "
        f"(rebuild {row['sparse_rebuild_ms_per_update']:.0f} ms)",
        flush=True,
    )
    return row


def _rebuilds(v: Variant) -> tuple[int, float]:
    if v.sp.kernels is None:
        return 0, 0.0
    return v.sp.kernels.stats.rebuilds, v.sp.kernels.stats.rebuild_s


def conv_probe(sparsity: float, rounds: int) -> dict:
    """Conv2d 32->64 3x3 on 14x14, batch 128 (the small CNN's conv2), forward + backward:
    oneDNN dense vs im2col + CSR with the kernels' products."""
    torch.manual_seed(0)
    cin, cout, side = 32, 64, 14
    x = torch.randn(BATCH, cin, side, side)
    mask = mask_ops.random_mask(
        (cout, cin * 9), mask_ops.n_keep(cout * cin * 9, sparsity), torch.Generator()
    )
    weight = torch.randn(cout, cin * 9) * mask
    gy = torch.randn(BATCH, cout, side, side)
    s = LinearStructure.from_mask(mask)
    w4 = weight.view(cout, cin, 3, 3).requires_grad_()
    xd = x.clone().requires_grad_()

    def dense() -> None:
        out = F.conv2d(xd, w4, padding=1)
        torch.autograd.grad(out, (xd, w4), gy)

    def sparse() -> None:
        with torch.no_grad():
            cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, cin * 9)
            values = s.gather(weight)
            sparse_linear_forward(cols, values, None, s)
            g = gy.flatten(2).transpose(1, 2).reshape(-1, cout)
            grad_cols = sparse_grad_input(g, values, s)
            grad_cols = grad_cols.reshape(BATCH, side * side, cin * 9).transpose(1, 2)
            F.fold(grad_cols, (side, side), 3, padding=1)
            sparse_grad_weight(g, cols, s)

    dense()
    sparse()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(rounds):
        for k, fn in (("dense", dense), ("sparse", sparse))[:: 1 if r % 2 == 0 else -1]:
            times[k].append(_timed(fn))
    row = {
        "layer": "Conv2d 32->64 3x3, 14x14, batch 128, forward + backward",
        "sparsity": sparsity,
        "dense_ms": 1e3 * statistics.median(times["dense"]),
        "im2col_csr_ms": 1e3 * statistics.median(times["sparse"]),
        "speedup": _median_ratio(times["dense"], times["sparse"]),
    }
    print(
        f"conv probe {sparsity:4.0%}: dense {row['dense_ms']:.1f} ms, im2col+CSR "
        f"{row['im2col_csr_ms']:.1f} ms: x{row['speedup']:.2f}",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    """Markdown table of step times and speed-ups over dense."""
    lines = [
        "| model | sparsity | dense step | sparse step | sparse | sparse, updates /100 | auto "
        "| auto, updates /100 | rebuild per update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {MODELS[r['model']]} | {r['sparsity']:.0%} | {r['dense_step_ms']:.0f} ms "
            f"| {r['sparse_step_ms']:.0f} ms | {r['sparse_speedup']:.2f}x "
            f"| {r['sparse_speedup_with_updates']:.2f}x | {r['auto_speedup']:.2f}x "
            f"| {r['auto_speedup_with_updates']:.2f}x "
            f"| {r['sparse_rebuild_ms_per_update']:.0f} ms |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, threads: int) -> None:
    """Speed-up over dense vs sparsity, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        pts = sorted((r for r in rows if r["model"] == model), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in pts]
        for key, label, style in (
            ("sparse_speedup", "sparse", "o-"),
            ("sparse_speedup_with_updates", "sparse, mask updates /100", "o--"),
            ("auto_speedup", "auto", "s-"),
            ("auto_speedup_with_updates", "auto, mask updates /100", "s--"),
        ):
            ax.plot(xs, [r[key] for r in pts], style, label=label, ms=4)
        top = max(r[k] for r in pts for k in ("sparse_speedup", "auto_speedup"))
        ax.set_ylim(0.5, max(1.5, 1.1 * top))
        ax.axhspan(0.85, 1.15, color="gray", alpha=0.15, lw=0)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(MODELS[model])
        ax.set_xlabel("sparsity (%)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training-step speed-up over dense")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Training step on sparse kernels vs dense, batch {BATCH},\nCPU "
        f"({threads} thread{'s' * (threads > 1)}; gray band: ties)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90%% and 98%%, 3 rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_speed.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/figures/train_speedup.png")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=None, help="override")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7, quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (4, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="SGD(fused=True) in every variant: the same update in one pass per tensor, without "
        "the weight-decay temporary",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = args.sparsities or ((0.9, 0.98) if args.quick else SPARSITIES)
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (2 if args.quick else 4)

    load_before, start = os.getloadavg(), time.perf_counter()
    rows = [measure(m, s, rounds, steps, args.fused) for m in args.models for s in sparsities]
    probes = [conv_probe(s, rounds) for s in (0.95, 0.98)]
    result = {
        "command": " ".join(["python", "benchmarks/train_speed.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "sgd_fused": args.fused,
        "rounds": rounds,
        "steps_per_block": steps,
        "update_every": UPDATE_EVERY,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "conv_probe": probes,
    }
    print("\nTraining-step speed-up over dense (median of paired rounds):")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.plot, result["threads"])
    print(f"\nwrote {args.out} and {args.plot} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
