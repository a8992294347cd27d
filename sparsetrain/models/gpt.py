"""A small decoder-only Transformer language model, built the way nanoGPT builds GPT-2.

Token and learned position embeddings (``nn.Embedding``), pre-norm blocks of causal
self-attention and a 4x MLP, a final LayerNorm and a head tied to the token embedding. The
attention projections are separate ``nn.Linear`` layers (``q``, ``k``, ``v``, ``proj``) rather
than one fused ``qkv``: each is then its own sparse tensor with its own per-layer sparsity (ERK,
N:M along its input), as in the papers' Transformer models. Under the default layer selection the
projections and MLP weights are sparse; embeddings, norms, biases and the tied head (which *is*
the token embedding's parameter) stay dense.

Reference: https://github.com/karpathy/nanoGPT (model.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.models.registry import register_model, scale_width
from sparsetrain.tasks import LANGUAGE_MODEL

__all__ = ["GPT", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 128  # longest sequence (number of learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # must be a multiple of n_head

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"gpt {f.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"gpt n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.n_embd, config.n_embd)
        self.k = nn.Linear(config.n_embd, config.n_embd)
        self.v = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        heads = (b, t, self.n_head, c // self.n_head)
        q, k, v = (f(x).view(heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx)``: token ids ``[B, T]`` (T <= block_size) -> next-token logits ``[B, T, V]``.

    Parameter names read ``tok_emb.weight``, ``blocks.0.attn.q.weight``, ``blocks.0.mlp.fc.weight``,
    ... ``head.weight`` is the same tensor as ``tok_emb.weight``; ``named_parameters()`` lists it
    once, under the embedding's name.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: the embedding is the output layer too
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by depth, so the residual stream's variance
        # does not grow with the number of blocks.
        std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size {self.config.block_size}")
        positions = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@register_model("gpt", task=LANGUAGE_MODEL)
def gpt(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: float,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
) -> GPT:
    """A GPT for the dataset's vocabulary (``num_classes``) and sequence length (``image_size``).

    ``width`` scales the head size, so ``n_embd`` stays a multiple of ``n_head`` (a thin dense
    baseline of the same depth and heads).
    """
    if in_channels != 1:
        raise ConfigError(
            f"gpt reads token sequences (in_channels 1), got in_channels {in_channels}"
        )
    config = GPTConfig(num_classes, image_size, n_layer, n_head, n_embd)  # checks the values
    head_size = scale_width(n_embd // n_head, width)
    return GPT(dataclasses.replace(config, n_embd=n_head * head_size))
