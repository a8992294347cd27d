"""Train a small GPT-2 sparse with the Hugging Face Trainer and SparsityCallback.

The data is sparsetrain's byte-level text (the Python standard library's source by default,
nothing to download); the model is a randomly initialised 2-layer GPT-2 of width 64 over the 256
byte values, so the evaluation loss in bits is bits per byte. RigL keeps 90% of the Transformer
blocks' weights at zero from the first step; every checkpoint the Trainer writes holds the
sparsifier's state beside the optimizer's, and ``--resume`` continues from the newest one
exactly (the same masks and, on a CPU, the same weights as a run never interrupted).

    python examples/hf_gpt2.py                     # about 15 s on one CPU core
    python examples/hf_gpt2.py --steps 600 --out runs/hf_gpt2_long
    python examples/hf_gpt2.py --resume            # after an interruption

Needs ``pip install -e .[hf]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from sparsetrain.data import text
from sparsetrain.integrations.hf import SparsityCallback

BLOCK = 64  # bytes of context


class Windows(torch.utils.data.Dataset):
    """Byte windows as the Trainer feeds a causal LM: labels are the inputs (the model shifts)."""

    def __init__(self, split: str, data_dir: str | None, **options: int) -> None:
        self.ids, _ = text.load(split, data_dir, block_size=BLOCK, **options)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", default="runs/hf_gpt2", help="the Trainer's output_dir")
    parser.add_argument("--data-dir", default=None, help="a directory of text files")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    torch.manual_seed(0)

    batch = 16
    train = Windows("train", args.data_dir)  # 16,384 windows, the same for every --steps
    val = Windows("test", args.data_dir, max_val_tokens=4 * batch * BLOCK)
    config = GPT2Config(
        vocab_size=256,
        n_positions=BLOCK,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        learning_rate=3e-3,
        warmup_steps=args.steps // 10,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 4),
        save_strategy="steps",
        save_steps=max(1, args.steps // 2),
        save_total_limit=2,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    sparsity = SparsityCallback(method="rigl", sparsity=args.sparsity, update_every=20)
    trainer = Trainer(
        model=model, args=training, train_dataset=train, eval_dataset=val, callbacks=[sparsity]
    )
    last = get_last_checkpoint(args.out) if args.resume and Path(args.out).is_dir() else None
    trainer.train(resume_from_checkpoint=last)  # None: from the first step

    loss = trainer.evaluate()["eval_loss"]
    final = Path(args.out) / "final"
    trainer.save_model(str(final))  # the masked weights: a plain GPT2LMHeadModel checkpoint
    stz = sparsity.save_compressed(final)  # kept values + bitmask, lossless
    sp = sparsity.sparsifier
    print(sp.report())
    print(f"validation: {loss / math.log(2):.3f} bits per byte after {sp.step} steps")

    reloaded = dict(GPT2LMHeadModel.from_pretrained(str(final)).named_parameters())
    zeros = sum(int((reloaded[name] == 0).sum()) for name in sp.masks)
    total = sum(mask.numel() for mask in sp.masks.values())
    print(f"reloaded from {final}: {zeros / total:.2%} of the sparse weights are zero")
    print(f"sparsity {sp.sparsity:.2%}; compressed export {stz}")


if __name__ == "__main__":
    main()
