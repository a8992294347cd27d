"""P-GaP's merge: one model from the workers' models, the same bits however the workers ran.

The layers of group k, meaning every parameter and buffer of the modules owning its sparse
weights and of the norms that follow them (:func:`sparsetrain.methods.gap.partitions.layer_state_keys`), come
from worker k, so a conv and the BatchNorm statistics computed from it stay together. Everything
else is averaged over the workers: layers in no group, dense layers and their norms.
The sum runs in worker order, in one process (:func:`merge_workers`) as over ranks
(:func:`merge_ranks`, which gathers the averaged tensors and sums them on every rank), so both
give the same bits. Integer buffers, such as BatchNorm's batch counter, come from worker 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sparsetrain.collectives import all_gather_tensors, broadcast_tensors

__all__ = ["merge_ranks", "merge_workers"]


def _ordered_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean summed in worker order: the same bits in every process that holds the same copies."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.div_(len(tensors))


def merge_workers(
    states: Sequence[Mapping[str, torch.Tensor]], group_keys: Sequence[Sequence[str]]
) -> dict[str, torch.Tensor]:
    """The merged state of worker ``states`` (worker k's ``state_dict``): see the module docstring.

    Keys of group k come from ``states[k]``; other floating-point keys are averaged in worker
    order; other keys (integer counters) come from worker 0. A worker's state may leave out the
    other groups' keys.
    """
    owner = {key: k for k, keys in enumerate(group_keys) for key in keys}
    merged = {}
    for key in dict.fromkeys(key for state in states for key in state):
        if key in owner:
            merged[key] = states[owner[key]][key].clone()
        elif states[0][key].is_floating_point():
            merged[key] = _ordered_mean([state[key] for state in states])
        else:
            merged[key] = states[0][key].clone()
    return merged


def merge_ranks(state: Mapping[str, torch.Tensor], group_keys: Sequence[Sequence[str]]) -> None:
    """:func:`merge_workers` in place over the ranks of a process group: rank k holds worker k's
    ``state`` (a ``state_dict``, whose tensors share the model's storage)."""
    owned = {key for keys in group_keys for key in keys}
    floats = [k for k, v in state.items() if k not in owned and v.is_floating_point()]
    others = [k for k, v in state.items() if k not in owned and not v.is_floating_point()]
    gathered = all_gather_tensors([state[k] for k in floats])
    merged = [_ordered_mean(copies) for copies in zip(*gathered, strict=True)]
    with torch.no_grad():
        for key, value in zip(floats, merged, strict=True):
            state[key].copy_(value)
    for k, keys in enumerate(group_keys):
        broadcast_tensors([state[key] for key in keys], src=k)
    broadcast_tensors([state[key] for key in others], src=0)
