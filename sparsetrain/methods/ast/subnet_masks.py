"""The masks of K nested sub-networks and the operations that change them (AST).

Every sparse tensor has one bool mask per sub-network, held as a ``[K, *shape]`` stack; sub-network
``i`` is row ``i`` of every stack. The *support* of sub-network ``i`` is the mask it must stay
inside: sub-network ``i - 1``'s when nesting is enforced, all ones otherwise. Every operation here
keeps its result inside the support, and :meth:`SubnetMasks.repair_from` restores nesting after a
denser mask changed. When the masks change is the method's business, not this class's.

Under FSDP2 a stack holds, at rest, only this rank's shard, ``[K, *local shard shape]``, each row
cut as its weight is, so memory per rank scales with the shard and switching sub-network needs no
communication. Every change and every whole reading runs inside :meth:`SubnetMasks.whole`, which
gathers the whole stacks, so decisions are exactly one unsharded process's, and keeps the local
slices again afterwards. Unsharded, the stacks are whole and ``whole`` changes nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from sparsetrain import sharding
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.methods.ast.nested_masks import is_nested, nm_within, prune_regrow, select_within

__all__ = ["SubnetMasks", "check_nm", "nm_compatible"]

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]


class SubnetMasks:
    """All-ones masks for ``num_subnets`` sub-networks over ``params``.

    ``nm``: one (N, M) per sub-network for N:M masks on the tensors ``nm_layers`` (the others stay
    dense); None for unstructured masks. ``floors``: the fewest weights each tensor keeps in a
    selection by one global count (the density floor).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        num_subnets: int,
        *,
        nested: bool = True,
        nm: Sequence[tuple[int, int]] | None = None,
        nm_layers: Sequence[str] = (),
        floors: Mapping[str, int] | None = None,
    ) -> None:
        self.num_subnets = num_subnets
        self.floors = dict(floors or {})
        self.nested = nested
        self.nm = None if nm is None else list(nm)
        self.nm_layers = list(nm_layers)
        self.params = dict(params)  # each stack's rows are cut as their parameter
        self.stack: Masks = {
            name: torch.ones(
                (num_subnets, *sharding.local(p).shape), dtype=torch.bool, device=p.device
            )
            for name, p in params.items()
        }
        self._counts = {name: [p.numel()] * num_subnets for name, p in params.items()}
        self._whole = False

    @contextmanager
    def whole(self) -> Iterator[None]:
        """Hold the whole stacks inside, this rank's slices again after (re-entrant).

        Under FSDP an all-gather: every rank enters, at mask updates and whole readings only.
        """
        if self._whole:
            yield
            return
        placed = {n: sharding.placed_stack(s, self.params[n]) for n, s in self.stack.items()}
        self.stack = {n: sharding.full(s) for n, s in placed.items()}
        self._whole = True
        try:
            yield
        finally:
            self._whole = False
            self._counts = {n: [int(row.sum()) for row in s] for n, s in self.stack.items()}
            self.stack = {n: _cut(s, placed[n]) for n, s in self.stack.items()}

    # ---------------------------------------------------------------- reading
    def masks(self, i: int) -> Masks:
        """Sub-network ``i``'s masks (views into the stacks: copy before keeping them); at rest
        under FSDP this rank's slices, shown as DTensors placed like their weights."""
        if self._whole:
            return {name: stack[i] for name, stack in self.stack.items()}
        return {n: sharding.placed(s[i], self.params[n]) for n, s in self.stack.items()}

    def counts(self, i: int) -> dict[str, int]:
        """Active weights of sub-network ``i`` per tensor (known without communication)."""
        return {name: counts[i] for name, counts in self._counts.items()}

    def support(self, i: int) -> Masks:
        """Where sub-network ``i``'s mask may be: the denser neighbour's mask when nested."""
        if self.nested and i > 0:
            return self.masks(i - 1)
        return {name: torch.ones_like(stack[0]) for name, stack in self.stack.items()}

    def sparsity(self, i: int) -> float:
        """Fraction of zeros of sub-network ``i`` over all its tensors (no communication)."""
        total = sum(self.params[name].numel() for name in self.stack)
        return 1.0 - sum(self.counts(i).values()) / max(1, total)

    def overlap(self) -> list[float]:
        """For each sub-network after the first, the fraction of its active weights also active in
        the next denser one: 1.0 everywhere when the masks are nested (under FSDP a collective)."""
        out = []
        with self.whole():
            for i in range(1, self.num_subnets):
                inner = sum(int((s[i] & s[i - 1]).sum()) for s in self.stack.values())
                out.append(inner / max(1, _count(self.masks(i))))
        return out

    # ---------------------------------------------------------------- changes
    def prune(self, i: int, magnitude: Masks, counts: int | dict[str, int]) -> None:
        """Keep the largest magnitudes inside the support: one global count or one per tensor."""
        with self.whole():
            self._write(i, _select(magnitude, self.support(i), counts, floors=self.floors))

    def regrow(self, i: int, magnitude: Masks, grow_score: Masks, fraction: float) -> None:
        """Per tensor of ``grow_score``: drop ``fraction`` by smallest magnitude, regrow as many
        by largest grow score inside the support (counts unchanged)."""
        with self.whole():
            support = self.support(i)
            for name, score in grow_score.items():
                mask, inside = self.stack[name][i], support[name]
                self.stack[name][i] = prune_regrow(magnitude[name], score, mask, inside, fraction)

    def set_nm(self, i: int, magnitude: Masks, sparse_fraction: float) -> None:
        """N:M masks for sub-network ``i`` inside its support, ``sparse_fraction`` of groups N:M."""
        n, m = self.nm[i]
        with self.whole():
            support = self.support(i)
            for name in self.nm_layers:
                self.stack[name][i] = nm_within(
                    magnitude[name], support[name], n, m, sparse_fraction, name
                )

    def repair_from(
        self,
        first: int,
        magnitude: Masks,
        *,
        global_count: bool = True,
        nm_fractions: Sequence[float] = (),
    ) -> None:
        """Bring sub-networks ``first..K-1`` back inside their denser neighbour, densest first.

        Unstructured masks keep every position still inside and refill each tensor's lost ones
        by magnitude, keeping its count where the support has room; with ``global_count`` a
        shortfall is then refilled over all tensors, so the total count is kept too. N:M masks
        are recomputed inside the new support at their group fraction ``nm_fractions[i]``. Stops
        at the first mask already nested: the sparser ones, unchanged, are nested in it.
        """
        with self.whole():
            self._repair_from(first, magnitude, global_count, nm_fractions)

    def _repair_from(
        self, first: int, magnitude: Masks, global_count: bool, nm_fractions: Sequence[float]
    ) -> None:
        for i in range(first, self.num_subnets):
            masks, support = self.masks(i), self.support(i)
            if is_nested(masks, support):
                return
            if self.nm is not None:
                self.set_nm(i, magnitude, nm_fractions[i])
                continue
            counts = {n: min(int(m.sum()), int(support[n].sum())) for n, m in masks.items()}
            prefer = {n: m & support[n] for n, m in masks.items()}
            repaired = _select(magnitude, support, counts, prefer)
            if global_count:
                total = min(_count(masks), _count(support))
                repaired = select_within(magnitude, support, total, repaired, self.floors)
            self._write(i, repaired)

    def _write(self, i: int, masks: Masks) -> None:
        for name, mask in masks.items():
            self.stack[name][i] = mask

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The stacks (under FSDP DTensors of the whole stacks, holding this rank's slices)."""
        return {n: sharding.placed_stack(s.clone(), self.params[n]) for n, s in self.stack.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Stacks saved whole or placed, on any number of ranks (a collective under FSDP)."""
        if set(state) != set(self.stack) or any(
            tuple(state[n].shape) != (self.num_subnets, *p.shape) for n, p in self.params.items()
        ):
            raise CheckpointError(
                "sub-network masks do not match the model's sparse parameters or the number of "
                f"sub-networks ({self.num_subnets})"
            )
        placed = {n: sharding.placed_stack(s, self.params[n]) for n, s in self.stack.items()}
        self.stack = {n: _cut(state[n], placed[n]) for n in self.stack}
        with self.whole():
            pass  # the whole stacks are counted on the way out


def _cut(stack: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``stack`` (whole, or a DTensor), cut as ``like``, in storage of its
    own under FSDP (a view would keep the whole stack alive)."""
    local = sharding.shard_of(stack, like).to(device=like.device, dtype=torch.bool)
    return local.clone() if sharding.is_sharded(like) else local


def _count(masks: Masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


def _select(
    magnitude: Masks,
    support: Masks,
    counts: int | dict[str, int],
    prefer: Masks | None = None,
    floors: Mapping[str, int] | None = None,
) -> Masks:
    """Largest magnitudes inside ``support``: one global count (each tensor keeping its floor),
    or a count per tensor."""
    if isinstance(counts, int):
        return select_within({n: magnitude[n] for n in support}, support, counts, prefer, floors)
    out: Masks = {}
    for name, count in counts.items():
        one = None if prefer is None else {name: prefer[name]}
        out |= select_within({name: magnitude[name]}, {name: support[name]}, count, one)
    return out


def check_nm(
    nm: Sequence[Sequence[int]] | None, sparsities: list[float], nested: bool
) -> list[tuple[int, int]] | None:
    """``nm`` as (N, M) pairs, checked against the sub-networks' sparsities (1 - N/M each);
    nested N:M masks need each M to be a multiple of the previous one's."""
    if nm is None:
        return None
    try:
        pairs = [(int(n), int(m)) for n, m in nm]
    except (TypeError, ValueError):
        raise ConfigError(f"ast: nm must be a list of (N, M) pairs, got {nm!r}") from None
    if any(not 0 < n < m for n, m in pairs):
        raise ConfigError(f"ast: every N:M needs 0 < N < M, got {pairs}")
    expected = [1.0 - n / m for n, m in pairs]
    if len(pairs) != len(sparsities) or not all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(expected, sparsities, strict=False)
    ):
        raise ConfigError(
            f"ast: sparsity {sparsities} does not match nm {[f'{n}:{m}' for n, m in pairs]}; "
            f"set sparsity to {[round(s, 6) for s in expected]}"
        )
    for (_, m0), (n1, m1) in zip(pairs, pairs[1:], strict=False):
        if nested and m1 % m0 != 0:
            raise ConfigError(
                "ast: nested N:M sub-networks need each M to be a multiple of the previous "
                f"one's, got M={m0} then {n1}:{m1}; reorder them or set nested=False"
            )
    return pairs


def nm_compatible(
    params: Mapping[str, torch.Tensor], pairs: Sequence[tuple[int, int]], skip: bool
) -> list[str]:
    """Names of the tensors whose input size every M divides; another is an error naming it,
    or with ``skip`` is left out (kept dense)."""
    names = []
    for name, p in params.items():
        bad = [m for _, m in pairs if p.shape[1] % m != 0]
        if not bad:
            names.append(name)
        elif skip:
            log.info("N:M: %s kept dense (input size %d, M=%d)", name, p.shape[1], bad[0])
        else:
            raise ConfigError(
                f"N:M: layer {name} has input size {p.shape[1]}, not a multiple of M={bad[0]}; "
                "exclude it from the sparse layers or set nm_skip_incompatible=True"
            )
    return names
