"""Gradient correction between consecutive sub-networks (AST, PCGrad-style projection).

Two sub-networks trained on consecutive steps share weights; where their gradients point against
each other, one step undoes the other. The projection removes from the current gradient its
component along the previous one when (and only when) they conflict: PCGrad's rule (Yu et al.
2020, https://arxiv.org/abs/2001.06782), which AST (Yang et al. 2022) applies per sparse weight
tensor within an inner group, with g_j the previous sub-network's gradient as its own mask left it
(the released code's ``pc_grads``):

    if <g_k, g_j> < 0:  g_k <- g_k - <g_k, g_j> / |g_j|^2 * g_j

The corrected g_k is orthogonal to g_j. It is no longer confined to the current mask (g_j is
nonzero on the previous sub-network's weights), so with the shared optimizer step it also moves
weights only the previous sub-network uses, as in the reference. EPS guards |g_j|^2 = 0; the
paper's own equation could not be retrieved, so this follows the released code's formula with the
intended order (correct with the stored gradient, then store the uncorrected one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["EPS", "project_conflicting"]

EPS = 1e-12  # added to the squared norm of the previous gradient


def project_conflicting(
    grads: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """Correct each gradient of ``grads`` in place against the same-named ``previous`` one
    (the module docstring's rule). Runs without a host sync; returns how many tensors were
    corrected (a 0-dim tensor), or None if none was compared."""
    fired = []
    for name, g in grads.items():
        if name not in previous:
            continue
        other = previous[name]
        dot = torch.dot(g.reshape(-1), other.reshape(-1))
        g.sub_(other * (dot.clamp(max=0.0) / (other.pow(2).sum() + EPS)))
        fired.append(dot < 0)
    return torch.stack(fired).sum() if fired else None
