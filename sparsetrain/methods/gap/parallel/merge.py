"""P-GaP's merge: one model from the workers' models, the same bits however the workers ran.

The layers of group k, meaning every parameter and buffer of the modules owning its sparse
weights and of the norms that follow them (:func:`sparsetrain.methods.gap.partitions.layer_state_keys`), come
from worker k, so a conv and the BatchNorm statistics computed from it stay together. Everything
else (layers in no group: a dense stem, dense layers and their norms) comes from worker 0, as the
reference takes its shared embedding from its first worker: an average of parameters that each
worker trained against a different grown group matches none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sparsetrain.collectives import broadcast_tensors

__all__ = ["merge_ranks", "merge_workers"]


def merge_workers(
    states: Sequence[Mapping[str, torch.Tensor]], group_keys: Sequence[Sequence[str]]
) -> dict[str, torch.Tensor]:
    """The merged state of worker ``states`` (worker k's ``state_dict``): see the module docstring.

    Keys of group k come from ``states[k]``, every other key from ``states[0]``. A worker's state
    may leave out the keys it does not provide.
    """
    owner = {key: k for k, keys in enumerate(group_keys) for key in keys}
    return {
        key: states[owner.get(key, 0)][key].clone()
        for key in dict.fromkeys(key for state in states for key in state)
    }


def merge_ranks(state: Mapping[str, torch.Tensor], group_keys: Sequence[Sequence[str]]) -> None:
    """:func:`merge_workers` in place over the ranks of a process group: rank k holds worker k's
    ``state`` (a ``state_dict``, whose tensors share the model's storage)."""
    owned = {key for keys in group_keys for key in keys}
    for k, keys in enumerate(group_keys):
        broadcast_tensors([state[key] for key in keys], src=k)
    broadcast_tensors([state[key] for key in state if key not in owned], src=0)
