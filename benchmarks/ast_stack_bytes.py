"""Bytes per rank of AST's stacks of nested sub-network masks under FSDP2, against the whole stacks.

Three sub-networks (sparsity 0.5, 0.75, 0.9) on MLPs of the given Linear sizes, each Linear and the
model sharded with ``fully_shard``, trained 8 steps with a mask update every 2 (so the stacks have
been gathered and cut again); then each rank counts the storage its stacks really hold
(``untyped_storage().nbytes()``: a view of a whole stack would show). Runs under torchrun (gloo,
CPU), one configuration per launch.

    python benchmarks/ast_stack_bytes.py                    # 2 and 4 processes, three MLPs
    python benchmarks/ast_stack_bytes.py --processes 2 --sizes 784,300,100,10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import sparsetrain as st  # noqa: E402

log = logging.getLogger("ast_stack_bytes")

SIZES = ["12,23,17,5", "784,300,100,10", "784,4096,4096,10"]  # the tests' Net, LeNet-300-100, wide
STEPS, BATCH = 8, 8


class MLP(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[:-1]:
            x = torch.relu(block(x))
        return self.blocks[-1](x)


def worker(sizes: list[int], out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = MLP(sizes)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sp = st.sparsify(
        model,
        opt,
        method="ast",
        sparsity=[0.5, 0.75, 0.9],
        total_steps=STEPS,
        steps_per_epoch=4,
        update_every=2,
    )
    for _ in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(BATCH, sizes[0]), torch.randint(0, sizes[-1], (BATCH,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
    stacks = sp.method.subnets.stack
    record = {
        "rank": dist.get_rank(),
        "bytes": sum(s.untyped_storage().nbytes() for s in stacks.values()),
        "whole_bytes": sp.method.num_subnets * sum(p.numel() for p in sp.params.values()),
        "shapes": {n: list(s.shape) for n, s in stacks.items()},
    }
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="Linear sizes, comma-separated")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/ast_stack_bytes.json")
    )
    parser.add_argument("--worker", nargs=2, metavar=("SIZES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        worker([int(s) for s in args.worker[0].split(",")], Path(args.worker[1]))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    rows = []
    for sizes in args.sizes:
        for n in args.processes:
            with tempfile.TemporaryDirectory() as tmp:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                command += ["--nproc-per-node", str(n), __file__, "--worker", sizes, tmp]
                subprocess.run(command, check=True, env=env, capture_output=True)
                ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(n)]
            row = {
                "sizes": sizes,
                "processes": n,
                "whole_bytes": ranks[0]["whole_bytes"],
                "bytes_per_rank": [r["bytes"] for r in ranks],
                "shapes_per_rank": [r["shapes"] for r in ranks],
            }
            rows.append(row)
            log.info(
                "%s on %d: whole %d, per rank %s",
                sizes,
                n,
                row["whole_bytes"],
                row["bytes_per_rank"],
            )
    args.output.write_text(json.dumps({"subnets": 3, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
