"""Steps per second and memory per rank of sparse RigL training: DDP vs FSDP2 on 1, 2, 4 processes.

A wide MLP (seventeen 2048-wide Linear layers, 67M weights: 1.25 GiB of weights, gradients, Adam
moments and masks) at 90% sparsity with AdamW, global batch 16 (memory, not compute, is the
point), one mask update every 10 steps (its dense gradient included). Each configuration runs in fresh
processes under torchrun (gloo, CPU); one process is the plain, unwrapped run. Per rank it records
the steps per second over the timed steps, the peak resident memory above the process's own
baseline (after imports, before the model exists), and the bytes of training state it holds
(weights, gradients, optimizer state and masks, counted from the live tensors). The workers run
with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns every large freed block to the system at
once, so the peak resident memory follows the tensors alive rather than the allocator's cache
(without it, freed all-gather and gradient buffers stay resident and every configuration's peak
grows towards the same ~2 GiB).

    python benchmarks/fsdp_memory.py                       # 1, 2, 4 processes, ddp and fsdp
    python benchmarks/fsdp_memory.py --processes 1 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import sparsetrain as st  # noqa: E402
from sparsetrain import sharding  # noqa: E402

log = logging.getLogger("fsdp_memory")

WIDTH, LAYERS, BATCH, WARMUP = 2048, 17, 16, 2


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WideMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS - 1)])
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer, sp: st.Sparsifier) -> int:
    """Bytes of weights, gradients, optimizer state and masks this rank holds."""
    total = 0
    for p in model.parameters():
        total += sharding.local(p).nbytes
        if p.grad is not None:
            total += sharding.local(p.grad).nbytes
        total += sum(sharding.local(v).nbytes for v in opt.state[p].values() if torch.is_tensor(v))
    return total + sum(sp.float_mask(n).nbytes for n in sp.params)


def worker(strategy: str, steps: int, out: Path) -> None:
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    baseline = _rss_mb()
    torch.manual_seed(0)
    model = WideMLP()
    forward: nn.Module = model
    if distributed and strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    elif distributed:
        forward = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = st.sparsify(
        model, opt, method="rigl", sparsity=0.9, total_steps=10 * steps, update_every=10
    )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH // size, WIDTH, generator=g)
    y = torch.randint(0, 10, (BATCH // size,), generator=g)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            if distributed:
                dist.barrier()
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
    if distributed:
        dist.barrier()
    elapsed = time.perf_counter() - start
    record = {
        "strategy": strategy if distributed else "single",
        "processes": size,
        "rank": rank,
        "steps_per_s": steps / elapsed,
        "peak_rss_above_baseline_mb": _rss_mb() - baseline,
        "state_mb": _state_bytes(model, opt, sp) / 2**20,
        "mask_updates": sp.method.dense_gradient_steps,
    }
    (out / f"{record['strategy']}-{size}-rank{rank}.json").write_text(json.dumps(record))
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/fsdp_memory.json"))
    parser.add_argument("--worker", nargs=2, metavar=("STRATEGY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        worker(args.worker[0], args.steps, Path(args.worker[1]))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("WORLD_SIZE", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            for strategy in ("ddp", "fsdp") if n > 1 else ("single",):
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                command += ["--nproc-per-node", str(n), __file__, "--steps", str(args.steps)]
                command += ["--worker", strategy, tmp]
                subprocess.run(command, check=True, env=env, capture_output=True)
                ranks = [
                    json.loads((Path(tmp) / f"{strategy}-{n}-rank{r}.json").read_text())
                    for r in range(n)
                ]
                row = {
                    "strategy": strategy,
                    "processes": n,
                    "steps_per_s": min(r["steps_per_s"] for r in ranks),
                    "peak_rss_above_baseline_mb": max(
                        r["peak_rss_above_baseline_mb"] for r in ranks
                    ),
                    "state_mb": max(r["state_mb"] for r in ranks),
                }
                rows.append(row)
                log.info("%s", row)
    args.output.write_text(json.dumps({"cpu_threads_per_process": 1, "rows": rows}, indent=2))
    print(
        "| strategy | processes | steps/s | peak RSS per rank (MiB) | training state per rank (MiB) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['processes']} | {r['steps_per_s']:.2f} | "
            f"{r['peak_rss_above_baseline_mb']:.0f} | {r['state_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
