"""Training-step time of sparsetrain's masked step vs a plain dense step vs torch.ao.pruning.

Interleaved in one process: each round times a block of steps of every variant in turn, and the
median over rounds is reported, so drift of the shared machine hits all variants alike. Ratios are
variant time / dense time (1.00 = no overhead).

    python benchmarks/step_overhead.py            # MLP and small CNN, batch 128, 90% sparsity
    python benchmarks/step_overhead.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

import sparsetrain as st
from sparsetrain.models import build_model


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _step_fn(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _ao_sparsify(model: nn.Module, sparsity: float) -> list[str]:
    """torch.ao.pruning on every Linear weight (its WeightNormSparsifier fails on 4-D conv weights)."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    sparsifier = WeightNormSparsifier(
        sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1
    )
    sparsifier.prepare(model, [{"tensor_fqn": n} for n in names])
    sparsifier.step()
    return names


def _variants(model_name: str, sparsity: float, batch: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=1, num_classes=10, image_size=28)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    dense = copy.deepcopy(base)
    ours = copy.deepcopy(base)
    ours_opt = _optimizer(ours)
    st.sparsify(ours, ours_opt, method="static", sparsity=sparsity)
    ao = copy.deepcopy(base)
    _ao_sparsify(ao, sparsity)
    return {
        "dense": _step_fn(dense, _optimizer(dense), x, y),
        "sparsetrain": _step_fn(ours, ours_opt, x, y),
        "torch.ao (Linear only)": _step_fn(ao, _optimizer(ao), x, y),
    }


def measure(
    model_name: str, sparsity: float, batch: int, rounds: int, steps: int
) -> dict[str, float]:
    """Median seconds per step of each variant, interleaved round by round."""
    variants = _variants(model_name, sparsity, batch)
    for fn in variants.values():  # warm-up: allocator, oneDNN primitive caches
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "small_cnn"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 5 steps")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 5, 5
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, sparsity {args.sparsity}"
    )
    print(f"{'model':<10} {'variant':<24} {'ms/step':>8} {'vs dense':>9}")
    for model_name in args.models:
        medians = measure(model_name, args.sparsity, args.batch, args.rounds, args.steps)
        results[model_name] = medians
        for name, seconds in medians.items():
            print(
                f"{model_name:<10} {name:<24} {seconds * 1e3:8.2f} {seconds / medians['dense']:8.3f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds_per_step": results}, f, indent=2)


if __name__ == "__main__":
    main()
