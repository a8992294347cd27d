"""Which parameters of an arbitrary ``nn.Module`` are sparse.

The default follows the field's convention: the weights of layers are sparse, that is every
parameter with two or more dimensions whose own name contains ``weight`` (``nn.Linear``,
``nn.Conv1d/2d/3d``, Hugging Face's ``Conv1D``, ``nn.MultiheadAttention``'s ``in_proj_weight``,
RNN ``weight_ih_l0``/``weight_hh_l0``, a custom layer's ``weight``). Dense by default:

* biases and norms (1-D);
* embeddings (``nn.Embedding``/``nn.EmbeddingBag`` weights, and any parameter tied to one, such as
  a language model's head): a lookup table computes nothing to save, and a pruned row is a token
  the model can no longer represent;
* free-standing tensors of other names: learned positional tables (``pos_embed``), class tokens,
  relative-position bias tables, a custom module's ``W``. They are added to activations or looked
  up rather than multiplied by them, so pruning them removes information, not compute.

``include=`` makes any parameter sparse. Names are fully-qualified, as in ``state_dict``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence

from torch import nn

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError

__all__ = ["check_layer_sparsity", "layer_overrides", "select_parameters"]

log = logging.getLogger(__name__)

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _embedding_tensors(model: nn.Module) -> set[int]:
    """Ids of the parameters owned by an embedding anywhere in ``model`` (tied heads included)."""
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, _EMBEDDINGS)
        for p in module.parameters(recurse=False)
    }


def _is_layer_weight(name: str) -> bool:
    return "weight" in name.rpartition(".")[2]


def _matching(globs: Sequence[str], names: Sequence[str], what: str) -> set[str]:
    matched: set[str] = set()
    for pattern in globs:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(f"{what} pattern {pattern!r} matches no parameter of the model")
        matched.update(hits)
    return matched


def select_parameters(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    include_embeddings: bool = False,
) -> dict[str, nn.Parameter]:
    """Return the sparse parameters of ``model``, by fully-qualified name, in module order.

    Args:
        include: name globs; when given, exactly the parameters matching them are candidates
            (any dimensionality), instead of the default rule (the module docstring).
        exclude: name globs of parameters to keep dense.
        dense_first / dense_last: keep the first / last selected parameter dense (papers often
            leave the stem conv and the classifier dense).
        include_embeddings: make ``nn.Embedding`` weights (and tensors tied to them) sparse too.

    A glob that matches no parameter is an error, so a typo cannot silently train a dense layer.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if include is not None:
        candidates = _matching(include, names, "include")
    else:
        embeddings = set() if include_embeddings else _embedding_tensors(model)
        candidates, tables = set(), []
        for name, p in model.named_parameters():
            if not p.requires_grad or p.dim() < 2 or id(p) in embeddings:
                continue
            (candidates.add if _is_layer_weight(name) else tables.append)(name)
        if tables:
            log.info(
                "dense by default (not a layer weight; include= makes them sparse): %s",
                ", ".join(tables),
            )
    candidates -= _matching(exclude, names, "exclude")
    ordered = [name for name in names if name in candidates]
    if dense_first and ordered:
        ordered = ordered[1:]
    if dense_last and ordered:
        ordered = ordered[:-1]
    params = dict(model.named_parameters())
    return {name: params[name] for name in ordered}


def check_layer_sparsity(globs: Mapping[str, float] | None) -> dict[str, float]:
    """``{glob: sparsity}`` with every sparsity checked, before any model's names are known."""
    if not globs:
        return {}
    if not isinstance(globs, Mapping):
        raise ConfigError(f"layer_sparsity must map name globs to sparsities, got {globs!r}")
    return {
        str(pattern): mask_ops.check_sparsity(value, f"layer_sparsity[{pattern!r}]")
        for pattern, value in globs.items()
    }


def layer_overrides(globs: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    """``{glob: sparsity}`` resolved to sparse parameter names (later globs win)."""
    out: dict[str, float] = {}
    for pattern, level in check_layer_sparsity(globs).items():
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(
                f"layer_sparsity pattern {pattern!r} matches no sparse parameter; sparse "
                f"parameters: {', '.join(names)}"
            )
        out.update(dict.fromkeys(hits, level))
    return out
