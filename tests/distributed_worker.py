"""Run by tests/test_distributed.py under ``torchrun``: what every rank holds, written to JSON.

Usage: torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT METHOD...

For each method: an uninterrupted run; a run that only rank 0 receives SIGTERM in (after step
STOP), which every rank must end at the same step boundary; its resumption. Then a check that a
rank with different masks is caught. ``OUT/rank<r>.json`` holds digests of each rank's results.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from sparsetrain.errors import SparsetrainError  # noqa: E402
from sparsetrain.train import loop  # noqa: E402
from sparsetrain.train.config import load_config  # noqa: E402
from sparsetrain.train.distributed import check_same_masks, tensor_digest  # noqa: E402
from sparsetrain.train.signals import TrainingInterrupted  # noqa: E402
from tests.method_cases import CASES, STEPS, STEPS_PER_EPOCH  # noqa: E402

STOP = 13
BATCH = 32  # the global batch: 16 examples per rank
BUILD_STATE = loop.build_state


def config(name: str, out: Path):
    case = CASES[name]
    options = [f"sparsity.options.{k}={json.dumps(v)}" for k, v in case["options"].items()]
    return load_config(
        None,
        [
            "data.name=synthetic",
            f"data.options.num_samples={BATCH * STEPS_PER_EPOCH}",
            "model.name=small_cnn",
            "model.width=0.25",
            f"train.epochs={STEPS // STEPS_PER_EPOCH}",
            f"train.batch_size={BATCH}",
            "train.log_every=0",
            "train.eval_every=3",
            "train.check_masks_every=5",
            f"sparsity.method={name}",
            f"sparsity.sparsity={json.dumps(case['sparsity'])}",
            f"train.out={out}",
            *options,
        ],
    )


def digest(state) -> str:
    """One hash of the weights, the masks and the optimizer state."""
    tensors = dict(state.model.state_dict())
    tensors.update({f"mask/{n}": m for n, m in state.sparsifier.masks.items()})
    for i, per_param in state.optimizer.state_dict()["state"].items():
        tensors.update({f"opt/{i}/{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
    return tensor_digest(tensors)


def instrumented(rank: int, grads: dict[int, str]):
    """build_state that signals rank 0 after step STOP and records the gradients that the
    method's before_step sees at each epoch's end and the dense ones it ranks at each update step
    (all-reduced ones agree across ranks)."""

    def build_state(cfg, data, device):
        state = BUILD_STATE(cfg, data, device)
        sp, method = state.sparsifier, state.sparsifier.method
        before = method.before_step

        def before_step(sparsifier, t):
            if method.needs_dense_grad(t):  # what the method ranks: the reduced dense gradient
                grads[f"dense{t}"] = tensor_digest({n: sparsifier.dense_grad(n) for n in sp.params})
            if t % STEPS_PER_EPOCH == 0:
                grads[t] = tensor_digest({n: p.grad for n, p in sp.params.items()})
            return before(sparsifier, t)

        def stop(optimizer, args, kwargs):
            if rank == 0 and sp.step == STOP:
                os.kill(os.getpid(), signal.SIGTERM)

        method.before_step = before_step
        state.optimizer.register_step_post_hook(stop)
        return state

    return build_state


def main(out: Path, methods: list[str]) -> None:
    rank = int(os.environ["RANK"])
    report = {}
    for name in methods:
        straight = loop.train(config(name, out / name / "straight"))
        grads: dict[int | str, str] = {}
        loop.build_state = instrumented(rank, grads)
        try:
            loop.train(config(name, out / name / "resumed"))
            stopped = None
        except TrainingInterrupted as error:
            stopped = error.step
        loop.build_state = BUILD_STATE
        resumed = loop.train(resume=out / name / "resumed")
        report[name] = {
            "straight": digest(straight.state),
            "resumed": digest(resumed.state),
            "masks": tensor_digest(straight.state.sparsifier.masks),
            "weights": tensor_digest(dict(straight.state.model.named_parameters())),
            "stopped": stopped,
            "grads": grads,
        }
    masks = {"w": torch.ones(8, dtype=torch.bool)}
    masks["w"][rank] = False
    try:
        check_same_masks(masks, 7)
        report["mismatch"] = None
    except SparsetrainError as error:
        report["mismatch"] = str(error)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2:])
