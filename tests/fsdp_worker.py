"""Run by tests/test_fsdp.py under ``torchrun``: sharded (FSDP2) sparse training against one
unsharded process on the same global batches, checked on every rank.

Usage: torchrun --standalone --nproc-per-node N tests/fsdp_worker.py OUT METHOD...

A METHOD written ``resume:NAME`` instead saves a DCP checkpoint at step SAVE_AT, trains on, then
loads it into freshly built objects and trains the same steps again.

Each rank trains the sharded model on its share of every global batch and, beside it, an unsharded
copy on the whole batch (the one-process reference). After every step the whole masks must equal
the reference's; at the end, masked weights and optimizer state must be zero on this rank's shard,
and the masks must hash the same on every rank. AST's stacks of sub-network masks must hold this
rank's shard only, switch sub-network without a collective, and read whole as the reference's.
``OUT/rank<r>.json`` holds what each rank saw.
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import sparsetrain as st  # noqa: E402
from sparsetrain import collectives, sharding  # noqa: E402
from sparsetrain.errors import ConfigError  # noqa: E402
from sparsetrain.sharded_checkpoint import load_sharded, save_sharded  # noqa: E402

STEPS = 24
SAVE_AT = 10
BATCH = 16  # the global batch
SPARSITY = 0.75

CASES = {
    "rigl": {"options": {"update_every": 4}},
    # two accumulated micro-batches per step: FSDP reduces each, the dense copy sums them
    "rigl-accumulate": {"method": "rigl", "accumulate": 2, "options": {"update_every": 4}},
    "set": {"options": {"update_every": 4}},
    "dsr": {
        "options": {
            "periods": [4],
            "period_starts": [0],
            "threshold": 0.05,
            "paper_dense_layers": False,
        },
    },
    "gmp": {"options": {"frequency": 3}},
    "acdc": {"distribution": "global", "options": {}},
    "static": {"distribution": "erk", "options": {}},
    "ast": {"sparsity": [0.5, 0.75, 0.9], "options": {"update_every": 3}},
    "gap": {"distribution": "global", "options": {"groups": 2, "dense_stem": False}},
}


class Net(nn.Module):
    """Odd layer sizes, so shards are uneven on 2 and 4 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 23), nn.Linear(23, 17), nn.Linear(17, 5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[:-1]:
            x = torch.relu(block(x))
        return self.blocks[-1](x)


class NormNet(nn.Module):
    """Net with a BatchNorm in each hidden block: AST's switchable BatchNorm under FSDP2."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(12, 23), nn.BatchNorm1d(23), nn.ReLU()),
                nn.Sequential(nn.Linear(23, 17), nn.BatchNorm1d(17), nn.ReLU()),
                nn.Linear(17, 5),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (BATCH,), generator=g),
        )
        for _ in range(steps)
    ]


def build(name: str, sharded: bool):
    torch.manual_seed(0)
    model = Net().double()
    if sharded:
        shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    case = CASES[name]
    sp = st.sparsify(
        model,
        opt,
        method=case.get("method", name),
        sparsity=case.get("sparsity", SPARSITY),
        total_steps=STEPS,
        steps_per_epoch=4,
        distribution=case.get("distribution"),
        **case["options"],
    )
    return model, opt, sp


def step(model, opt, x, y, accumulate: int = 1) -> None:
    opt.zero_grad()
    for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate), strict=True):
        (F.cross_entropy(model(xs), ys) / accumulate).backward()
    opt.step()


def share(x: torch.Tensor) -> torch.Tensor:
    size, rank = collectives.world_size(), collectives.rank()
    part = x.shape[0] // size
    return x[rank * part : (rank + 1) * part]


def run(name: str) -> dict:
    model, opt, sp = build(name, sharded=True)
    ref_model, ref_opt, ref = build(name, sharded=False)
    differing, changed, before = [], [], sp.full_masks()
    accumulate = CASES[name].get("accumulate", 1)
    for t, (x, y) in enumerate(batches(STEPS), 1):
        micro = [
            (share(xs), share(ys))
            for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate), strict=True)
        ]
        step(
            model,
            opt,
            torch.cat([m[0] for m in micro]),
            torch.cat([m[1] for m in micro]),
            accumulate,
        )
        step(ref_model, ref_opt, x, y, accumulate)
        whole = sp.full_masks()
        if any(not torch.equal(whole[n], m) for n, m in ref.masks.items()):
            differing.append(t)
        if any(not torch.equal(whole[n], m) for n, m in before.items()):
            changed.append(t)
        before = whole
    whole = sp.full_masks()
    local_zero = all(
        bool((sharding.local(p)[~sp.masks[n].to_local()] == 0).all()) for n, p in sp.params.items()
    )
    state_zero = all(
        bool((sharding.local(v)[~sp.masks[n].to_local()] == 0).all())
        for n, p in sp.params.items()
        for v in opt.state[p].values()
        if torch.is_tensor(v) and v.shape == p.shape
    )
    weights = {n: sharding.full(p.detach()) for n, p in model.named_parameters()}
    ref_weights = dict(ref_model.named_parameters())
    subnets = subnet_checks(sp, ref) if hasattr(sp.method, "subnets") else {}
    report, ref_report = sp.report(), ref.report()  # the sharded one: a collective forward
    return {
        **subnets,
        "flops": [report.flops.dense, report.flops.sparse, report.flops.per_module],
        "ref_flops": [ref_report.flops.dense, ref_report.flops.sparse, ref_report.flops.per_module],
        "train_flops_per_example": report.training_flops / sp.examples_per_step,
        "ref_train_flops_per_example": ref_report.training_flops / ref.examples_per_step,
        "differing_steps": differing,
        "digest": collectives.tensor_digest(whole),
        "active": {n: int(m.sum()) for n, m in whole.items()},
        "ref_active": {n: int(m.sum()) for n, m in ref.masks.items()},
        "sparsity": sp.sparsity,
        "ref_sparsity": ref.sparsity,
        "masks_are_dtensors": all(sharding.is_sharded(m) for m in sp.masks.values()),
        "mask_shard_shapes_match": all(
            sp.masks[n].to_local().shape == p.to_local().shape for n, p in sp.params.items()
        ),
        "weights_zero_off_mask": local_zero,
        "state_zero_off_mask": state_zero,
        "weights_close": all(
            torch.allclose(weights[n], ref_weights[n].detach(), atol=1e-9) for n in weights
        ),
        "changed_steps": changed,
    }


def subnet_checks(sp, ref) -> dict:
    """AST: the stacks hold this rank's shard only (their bytes against the shards' and the whole
    stacks'), switching sub-network needs no collective, and whole readings equal the reference's."""
    from torch.distributed.tensor.debug import CommDebugMode

    method, k = sp.method, sp.method.num_subnets
    stacks = method.subnets.stack
    with CommDebugMode() as switching:
        for i in range(k):
            method.use_subnet(sp, i)
        method.resume_training(sp)
    with CommDebugMode() as reading:
        masks = [method.subnet_masks(i) for i in range(k)]
    saved = sp.state_dict()["method_state"]["stack"]
    return {
        "stack_shapes": {n: list(s.shape) for n, s in stacks.items()},
        "stack_shapes_match": all(
            tuple(s.shape) == (k, *sharding.local(sp.params[n]).shape) for n, s in stacks.items()
        ),
        "stack_bytes": sum(s.untyped_storage().nbytes() for s in stacks.values()),
        "stack_shard_bytes": k * sum(sharding.local(p).numel() for p in sp.params.values()),
        "whole_stack_bytes": k * sum(p.numel() for p in sp.params.values()),
        "saved_stack_is_placed": all(sharding.is_sharded(s) for s in saved.values()),
        "switch_collectives": switching.get_total_counts(),
        "reading_collectives": reading.get_total_counts(),
        "subnet_masks_equal": all(
            torch.equal(masks[i][n], m)
            for i in range(k)
            for n, m in ref.method.subnet_masks(i).items()
        ),
        "saved_stack_equal": all(
            torch.equal(sharding.full(saved[n]), s)
            for n, s in ref.state_dict()["method_state"]["stack"].items()
        ),
        "subnet_sparsity": [method.subnet_sparsity(i) for i in range(k)],
        "ref_subnet_sparsity": [ref.method.subnet_sparsity(i) for i in range(k)],
        "overlap": method.nesting_overlap(),
        "ref_overlap": ref.method.nesting_overlap(),
    }


def whole_state(model, opt, sp) -> dict[str, torch.Tensor]:
    """Whole weights, masks, optimizer state and AST's stacks of masks, for digests."""
    out = {f"w/{n}": sharding.full(p.detach()) for n, p in model.named_parameters()}
    out.update({f"m/{n}": m for n, m in sp.full_masks().items()})
    if hasattr(sp.method, "subnets"):
        stacks = sp.state_dict()["method_state"]["stack"]
        out.update({f"s/{n}": sharding.full(s) for n, s in stacks.items()})
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            out[f"o/{n}/{k}"] = sharding.full(v)
    return out


def resume(name: str, out: Path) -> dict:
    data = batches(STEPS)
    model, opt, sp = build(name, sharded=True)
    for x, y in data[:SAVE_AT]:
        step(model, opt, share(x), share(y))
    save_sharded(out / name, model, opt, sp, extra={"step": SAVE_AT})
    saved = whole_state(model, opt, sp)
    for x, y in data[SAVE_AT:]:
        step(model, opt, share(x), share(y))
    straight = whole_state(model, opt, sp)
    model, opt, sp = build(name, sharded=True)
    extra = load_sharded(out / name, model, opt, sp)
    loaded = whole_state(model, opt, sp)
    for x, y in data[SAVE_AT:]:
        step(model, opt, share(x), share(y))
    resumed = whole_state(model, opt, sp)
    masks = {k: v for k, v in straight.items() if k.startswith("m/")}
    return {
        "extra": extra,
        "saved": collectives.tensor_digest(saved),
        "loaded": collectives.tensor_digest(loaded),
        "straight": collectives.tensor_digest(straight),
        "resumed": collectives.tensor_digest(resumed),
        "saved_masks": collectives.tensor_digest({k: v for k, v in saved.items() if k[0] == "m"}),
        "saved_weights": collectives.tensor_digest({k: v for k, v in saved.items() if k[0] == "w"}),
        "saved_stacks": collectives.tensor_digest({k: v for k, v in saved.items() if k[0] == "s"}),
        "final_masks": collectives.tensor_digest(masks),
    }


def switchable_batchnorm() -> dict:
    """AST on a model with BatchNorm: refused once the BatchNorm is sharded, and trained when its
    copies are made before ``fully_shard`` (``AST.prepare_model``). Per-rank batch statistics make
    the run differ from one process's, so what is checked is what must hold on its own: each step
    changes only the trained sub-network's copy, the copies are sharded, ranks agree, and every
    sub-network ends at its sparsity."""
    from sparsetrain.methods.ast import AST
    from sparsetrain.methods.ast.switchable_bn import SwitchableBatchNorm

    sparsities = CASES["ast"]["sparsity"]
    options = {"method": "ast", "sparsity": sparsities, "total_steps": STEPS, "update_every": 3}
    out = {}
    model = shard(NormNet().double())
    try:
        st.sparsify(model, torch.optim.AdamW(model.parameters(), lr=0.02), **options)
        out["refused"] = None
    except ConfigError as error:
        out["refused"] = str(error)
    torch.manual_seed(0)
    model = NormNet().double()
    AST.prepare_model(model, sparsity=sparsities)
    shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    sp = st.sparsify(model, opt, **options)
    (switch,) = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]

    def copies() -> list[torch.Tensor]:
        return [sharding.local(bn.weight.detach()).clone() for bn in switch.copies]

    moved = []
    for t, (x, y) in enumerate(batches(STEPS), 1):
        before = copies()
        step(model, opt, share(x), share(y))
        after = copies()
        changed = [i for i, a in enumerate(before) if not torch.equal(a, after[i])]
        moved.append(changed == [sp.method.training_subnet(t)])
    out["only_the_trained_copy_moves"] = all(moved)
    out["copies_sharded"] = all(sharding.is_sharded(p) for p in switch.parameters())
    out["optimizer_holds_each_copy_once"] = sorted(
        id(p) for g in opt.param_groups for p in g["params"]
    ) == sorted(id(p) for p in model.parameters())
    out["digest"] = collectives.tensor_digest(whole_state(model, opt, sp))
    out["subnet_sparsity"] = [sp.method.subnet_sparsity(i) for i in range(len(sparsities))]
    out["overlap"] = sp.method.nesting_overlap()
    return out


def refusals() -> dict:
    out = {}
    for key, kwargs in (
        ("sparse_kernels", {"method": "static", "kernels": "sparse"}),
        ("pgap", {"method": "gap", "parallel": True, "restart_optimizer": True}),
    ):
        model = shard(Net().double())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            st.sparsify(model, opt, sparsity=0.5, total_steps=STEPS, steps_per_epoch=4, **kwargs)
            out[key] = None
        except ConfigError as error:
            out[key] = str(error)
    model = shard(Net().double())
    sp = st.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5)
    try:
        sp.export()
        out["export"] = None
    except ConfigError as error:
        out["export"] = str(error)
    plain = Net().double()
    plain.load_state_dict(sp.full_state_dict(), strict=True)
    out["full_state_dict_sparsity"] = float((plain.blocks[0].weight == 0).double().mean())
    return out


def main(out: Path, methods: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {
        name: resume(name.split(":")[1], out) if name.startswith("resume:") else run(name)
        for name in methods
    }
    report["refusals"] = refusals()
    if "ast" in methods and collectives.world_size() == 2:
        report["switchable_batchnorm"] = switchable_batchnorm()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # Sharded modules left in reference cycles must go while their process group lives, and no
    # rank may tear its group down while a peer still finishes the last collective: otherwise
    # gloo's worker threads can abort the process at exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2:])
