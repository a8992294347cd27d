"""One small, fast configuration per registered method, used by the registry-driven tests.

Every registered method must have an entry (a test checks it), so a new method is covered by the
invariant tests automatically. ``steps`` runs are short: schedules are chosen so that every
method changes its masks at least once within them.

Keys: ``sparsity`` (float, or list for nested sub-networks), ``options`` (method options),
``final_sparsity`` (expected sparsity over sparse parameters after ``STEPS`` steps, or None to skip),
``kept_values`` (True when weights outside the active mask keep their values and optimizer state,
as in AST).
"""

from collections.abc import Callable

import torch
from torch import nn

import sparsetrain as st
from sparsetrain import tasks
from tests.conftest import TinyCNN

STEPS = 60
STEPS_PER_EPOCH = 10

CASES: dict[str, dict] = {
    "dense": {"sparsity": 0.0, "options": {}, "final_sparsity": 0.0},
    "static": {"sparsity": 0.8, "options": {}, "final_sparsity": 0.8},
    # imagenet preset scaled to 60 steps: warm-up 6, compressed/decompressed 3 each from step 6,
    # last dense 45-51, final compressed 51-60.
    "acdc": {"sparsity": 0.9, "options": {}, "final_sparsity": 0.9},
    # Prunes at steps 6, 16, 26, 36 and 45 (start 0.1, end 0.75 of 60 steps).
    "gmp": {"sparsity": 0.8, "options": {"frequency": 10}, "final_sparsity": 0.8},
    "set": {"sparsity": 0.8, "options": {"update_every": 10}, "final_sparsity": 0.8},
    # Updates at steps 10, 20, 30 and 40 (end 0.75 of 60 steps).
    "rigl": {"sparsity": 0.8, "options": {"update_every": 10}, "final_sparsity": 0.8},
    # Reparameterizes after steps 10, 20, 30 (P = 10) and 40 (P = 20 after step 30; stop at 54).
    "dsr": {
        "sparsity": 0.8,
        "options": {
            "periods": [10, 20],
            "period_starts": [0, 0.5],
            "stop": 0.9,
            "threshold": 0.01,
            "paper_dense_layers": False,
        },
        # Every selected weight is reparameterized, so the exact count covers them all (the
        # paper's dense layers, the default, are tested in test_dsr).
        "final_sparsity": 0.8,
    },
    # 2 rounds x 2 groups of 12 steps: prune-back/grow at 12, 24, 36; last prune at 48, fine-tune.
    # Every selected weight is grouped, so the exact count covers them all (the dense stem, the
    # default, is tested in test_gap and test_pgap).
    "gap": {"sparsity": 0.8, "options": {"groups": 2, "dense_stem": False}, "final_sparsity": 0.8},
    # Sub-network k updates at its first own step from 2k + 6j; the ramp ends at 42, the last
    # pruning updates are at 43, 44 and 48. After step 60, sub-network 60 mod 3 = 0 is active.
    "ast": {
        "sparsity": [0.5, 0.75, 0.9],
        "options": {"update_every": 6},
        "final_sparsity": 0.5,
        "kept_values": True,
    },
}


Batch = tuple[torch.Tensor, torch.Tensor]


def image_batch(g: torch.Generator) -> Batch:
    """16 random 16x16 images with 4 random labels: the inputs of ``TinyCNN``."""
    return torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)


def run_case(
    name: str,
    optimizer_name: str = "sgd",
    steps: int = STEPS,
    seed: int = 0,
    model_fn: Callable[[], nn.Module] = TinyCNN,
    batch_fn: Callable[[torch.Generator], Batch] = image_batch,
    sparsity: float | list[float] | None = None,
    attach: Callable[[torch.optim.Optimizer, st.Sparsifier], None] | None = None,
    **extra,
):
    """Train ``model_fn()`` (``TinyCNN``) on ``batch_fn`` batches with method ``name``'s case;
    returns model, optimizer, sparsifier and the masks after every step. ``sparsity`` (None: the
    case's) and ``extra`` go to ``sparsify`` (e.g. ``kernels="sparse"``), ``extra`` over the
    case's options. ``attach(optimizer, sparsifier)`` runs before the first step (to add hooks)."""
    torch.manual_seed(seed)
    model = model_fn()
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    case = CASES[name]
    sp = st.sparsify(
        model,
        opt,
        method=name,
        sparsity=case["sparsity"] if sparsity is None else sparsity,
        total_steps=STEPS,
        steps_per_epoch=STEPS_PER_EPOCH,
        seed=seed,
        **{**case["options"], **extra},
    )
    if attach is not None:
        attach(opt, sp)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        x, y = batch_fn(g)
        opt.zero_grad()
        tasks.loss(model(x), y).backward()
        opt.step()
        history.append(sp.masks)
    return model, opt, sp, history
