"""Train an MLP sparse with Lightning and SparsityCallback.

Synthetic data (a fixed random teacher network labels Gaussian inputs, nothing to download), RigL
at 90% sparsity, two accumulated batches per optimizer step and gradient clipping. The
sparsifier's state is part of every Lightning checkpoint, so ``--resume`` continues from
``last.ckpt`` exactly (the same masks and, on a CPU, the same weights as a run never
interrupted). The exported model is the plain ``nn.Sequential`` with the masks baked in.

    python examples/lightning_mlp.py               # a few seconds on one CPU core
    python examples/lightning_mlp.py --resume      # after an interruption

Needs ``pip install -e .[lightning]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from sparsetrain.integrations.lightning import SparsityCallback


class Classifier(pl.LightningModule):
    """A 64-128-128-10 MLP; ``net`` is the part that is sparsified and exported."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def synthetic(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Inputs labelled by one fixed random teacher (seed 0), so the task can be learned."""
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, (x @ teacher).argmax(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", default="runs/lightning_mlp", help="logs and checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from last.ckpt in --out")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    pl.seed_everything(0, verbose=False)

    data = synthetic(2048, seed=1)
    # Shuffled from (seed, epoch), not from the global RNG, which Lightning's checkpoints do not
    # hold: Lightning calls the sampler's set_epoch, so a resumed run sees the same batches.
    order = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0)
    train = torch.utils.data.DataLoader(data, batch_size=32, sampler=order)
    model = Classifier()
    sparsity = SparsityCallback(method="rigl", sparsity=args.sparsity, module="net", update_every=8)
    checkpoints = ModelCheckpoint(dirpath=Path(args.out) / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=[sparsity, checkpoints],
        default_root_dir=args.out,
        accelerator="cpu",
        log_every_n_steps=16,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    last = Path(args.out) / "checkpoints" / "last.ckpt"
    trainer.fit(model, train, ckpt_path=last if args.resume and last.is_file() else None)

    sp = sparsity.sparsifier
    plain = sp.export()  # an nn.Sequential with the masks baked in, no hooks
    test = synthetic(1024, seed=2).tensors
    with torch.no_grad():
        accuracy = (plain(test[0]).argmax(1) == test[1]).float().mean()
    print(sp.report())
    print(f"test accuracy {accuracy:.2%} after {sp.step} steps")
    print(f"sparsity {sp.sparsity:.2%}; checkpoints in {checkpoints.dirpath}")


if __name__ == "__main__":
    main()
