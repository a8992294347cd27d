"""Gradient correction between consecutive sub-networks (AST, PCGrad-style projection).

Two sub-networks trained on consecutive steps share weights; where their gradients point against
each other, one step undoes the other. The projection removes from the current gradient its
component along the previous one when (and only when) they conflict (Yu et al. 2020,
https://arxiv.org/abs/2001.06782; AST, Yang et al. 2022).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["EPS", "project_conflicting"]

EPS = 1e-12  # added to the squared norm of the previous gradient


def project_conflicting(
    grads: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> torch.Tensor | None:
    """Correct each gradient of ``grads`` in place against the same-named ``previous`` one.

    With g the current gradient (already zero outside its ``mask``) and p the previous one inside
    the mask: if <g, p> < 0 then g -= <g, p> / (|p|^2 + EPS) * p. Restricting p to the mask keeps
    the update on the active weights and leaves g orthogonal to the whole previous gradient
    (<g, p> is unchanged by the restriction, since g is zero outside). Runs without a host sync;
    returns how many tensors were corrected (a 0-dim tensor), or None if none was compared.
    """
    fired = []
    for name, g in grads.items():
        if name not in previous:
            continue
        other = previous[name] * masks[name]
        dot = torch.dot(g.reshape(-1), other.reshape(-1))
        g.sub_(other * (dot.clamp(max=0.0) / (other.pow(2).sum() + EPS)))
        fired.append(dot < 0)
    return torch.stack(fired).sum() if fired else None
