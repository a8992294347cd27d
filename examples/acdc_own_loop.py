"""AC/DC in a plain PyTorch loop, and its dense twin fine-tuned afterwards.

LeNet-300-100 on Fashion-MNIST (SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, cosine per
step, 20 epochs, about a minute on one CPU core) at 90% sparsity. The loop is the usual one;
after it, ``st.finetune_dense_twin`` trains the dense model of the pair over the final compressed
phase's steps at the learning rates the sparse model had there, as ``sparsetrain train`` does.
Prints the sparse model, the dense snapshot as it was kept, and the fine-tuned twin.

    python examples/acdc_own_loop.py                        # needs dataset-fashion-mnist
    python examples/acdc_own_loop.py --synthetic --epochs 2 # random data: a smoke run, seconds
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsetrain as st
from sparsetrain.data import load_dataset
from sparsetrain.models import build_model


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def datasets(synthetic: bool) -> tuple[TensorDataset, TensorDataset]:
    if synthetic:  # a fixed random teacher labels Gaussian images by their first 32 pixels
        teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
        x = torch.randn(5000, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        y = (x.flatten(1)[:, :32] @ teacher).argmax(1)
        return TensorDataset(x[:4000], y[:4000]), TensorDataset(x[4000:], y[4000:])
    return load_dataset("fashion_mnist", "train")[0], load_dataset("fashion_mnist", "test")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="random data, no download")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    train, test = datasets(args.synthetic)
    loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True)
    model = build_model("mlp")
    steps = args.epochs * len(loader)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    sp = st.sparsify(
        model,
        opt,
        method="acdc",
        sparsity=args.sparsity,
        total_steps=steps,
        steps_per_epoch=len(loader),
    )
    for epoch in range(args.epochs):
        model.train()
        for batch in loader:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()  # masks applied; AC/DC switches phases here
            sched.step()
        print(
            f"epoch {epoch + 1}: test {100 * accuracy(model, test):.2f}%, "
            f"sparsity {100 * sp.sparsity:.2f}%"
        )

    snapshot = sp.export(which="dense")  # the kept dense model, not yet fine-tuned (warns)
    twin = st.finetune_dense_twin(sp, loss_fn, loader)
    print(f"sparse model: {100 * accuracy(model, test):.2f}% at sparsity {100 * sp.sparsity:.2f}%")
    print(f"dense snapshot (end of the last dense phase): {100 * accuracy(snapshot, test):.2f}%")
    print(f"dense twin, fine-tuned: {100 * accuracy(twin, test):.2f}%")


if __name__ == "__main__":
    main()
