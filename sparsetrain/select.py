"""Which parameters of an arbitrary ``nn.Module`` are sparse.

The default follows the field's convention: every weight with two or more dimensions (Linear,
Conv1d/2d/3d, attention projections, RNN weight matrices, a user module's own matrices) is sparse;
biases, norms (1-D) and embeddings stay dense. Names are fully-qualified, as in ``state_dict``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from sparsetrain.errors import ConfigError

__all__ = ["select_parameters"]

_DENSE_BY_DEFAULT = (nn.Embedding, nn.EmbeddingBag)


def _owner_types(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Map each parameter's fully-qualified name to the type of the module that owns it."""
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            fqn = f"{module_name}.{param_name}" if module_name else param_name
            owners[fqn] = type(module)
    return owners


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
            (any dimensionality), instead of the default ``ndim >= 2`` rule.
        exclude: name globs of parameters to keep dense.
        dense_first / dense_last: keep the first / last selected parameter dense (papers often
            leave the stem conv and the classifier dense).
        include_embeddings: make ``nn.Embedding`` weights sparse too.

    A glob that matches no parameter is an error, so a typo cannot silently train a dense layer.
    """
    owners = _owner_types(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if include is not None:
        candidates = _matching(include, names, "include")
    else:
        candidates = {
            name
            for name, p in model.named_parameters()
            if p.requires_grad
            and p.dim() >= 2
            and (include_embeddings or not issubclass(owners[name], _DENSE_BY_DEFAULT))
        }
    candidates -= _matching(exclude, names, "exclude")
    ordered = [name for name in names if name in candidates]
    if dense_first and ordered:
        ordered = ordered[1:]
    if dense_last and ordered:
        ordered = ordered[:-1]
    params = dict(model.named_parameters())
    return {name: params[name] for name in ordered}
