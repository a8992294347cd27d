"""AST: alternating sparse training of nested sub-networks (Yang et al., NeurIPS 2022).

https://proceedings.neurips.cc/paper_files/paper/2022/hash/c7207c38b6e809a83d0688936a91c3b5-Abstract-Conference.html

One set of weights holds K sub-networks of increasing sparsity (densest first), each with its own
mask on every sparse tensor (:class:`~sparsetrain.methods.ast.subnet_masks.SubnetMasks`) and its own
BatchNorm (:mod:`sparsetrain.methods.ast.switchable_bn`; the first BatchNorm stays shared). Step ``t`` trains
only sub-network ``(t - 1) mod K`` with the one optimizer, so the run costs one ordinary training.
Masks use the sparsifier's kept-values mode with ``step_all``: weights outside the active mask keep
their values for the sub-networks that use them and get a zero gradient, but every optimizer step
applies to all shared weights (momentum and weight decay move them too), and their optimizer state
is never zeroed, as in the reference, whose layers mask only in the forward. Nesting is a property
of the masks and is kept whatever the weights do.

Masks follow GraNet: a cubic global magnitude ramp from dense to each sub-network's sparsity over
``prune_window``, and at every update a layer-wise prune-and-regrow (drop the smallest |w|, grow
the largest |dL/d(W*M)|, the dense gradient of the sub-network's own last step; the released code
grows with the masked one). Sub-network ``k`` updates every ``update_every`` steps, ``k *
update_offset`` steps after sub-network 0, at its first own step from each grid point. By default
``update_every`` is the reference CIFAR script's rate scaled to the run: 999 of its 62,560 steps
(160 epochs of 391), i.e. about 62 updates per sub-network in any run length, rounded to a
multiple of K (the reference only updates on multiples of K); a 62,560-step run gets exactly 999.
A fixed 999 (or ImageNet's 4,000) would give a Fashion-MNIST run of a few hundred steps no update
at all. With
``nested`` every mask stays inside the next denser one: chosen inside it, and repaired after a
denser update. ``nm=[(2, 4), (1, 4), (1, 8)]`` makes the sub-networks N:M along input channels:
the fraction of N:M groups ramps cubically over the window, then the masks are frozen.

Gradient correction (:mod:`sparsetrain.methods.ast.grad_correction`) projects the active
sub-network's gradient off the previous step's where they conflict (PCGrad's rule per weight
tensor), within inner groups of ``inner_group_size`` consecutive steps (K by default: one cycle;
none across a group's start, none at the first step); the *uncorrected* gradient is kept for the
next step (the released code stores it before correcting, so its correction never fires). By
default it is off for unstructured sub-networks and on for N:M ones, as the reference scripts run
it at CIFAR scale (``run_cifar.sh`` never passes ``--pc_grad``; ``run_nm_cifar.sh`` does, and so
does the ImageNet script).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sparsetrain import mask_ops
from sparsetrain.errors import CheckpointError, ConfigError, SparsetrainError
from sparsetrain.methods.ast.checkpoint import subnet_index
from sparsetrain.methods.ast.grad_correction import project_conflicting
from sparsetrain.methods.ast.subnet_masks import SubnetMasks, check_nm, nm_compatible
from sparsetrain.methods.ast.switchable_bn import (
    SwitchableBatchNorm,
    make_switchable,
    restore_batchnorms,
    set_active,
)
from sparsetrain.methods.base import Method
from sparsetrain.methods.registry import register_method
from sparsetrain.schedules import Cosine, Cubic, Every

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier
    from sparsetrain.methods.base import TrainingRun

log = logging.getLogger(__name__)

# The reference CIFAR script updates each sub-network's mask every 999 of its 62,560 steps.
REFERENCE_UPDATE_EVERY, REFERENCE_STEPS = 999, 160 * 391


def reference_update_every(total_steps: int, num_subnets: int) -> int:
    """The reference's update interval scaled to ``total_steps``, a multiple of the sub-networks."""
    scaled = total_steps * REFERENCE_UPDATE_EVERY / REFERENCE_STEPS
    return max(num_subnets, num_subnets * round(scaled / num_subnets))


@register_method("ast")
class AST(Method):
    """K nested sub-networks in one run; ``sp.use_subnet(i)`` switches them at inference.

    ``prune_window`` (start, end) is in ``unit`` (fraction of training by default);
    ``update_every`` / ``update_offset`` in optimizer steps (defaults: the reference's rate scaled
    to the run, see the module docstring / update_every // K); ``death_rate`` decays by cosine to 0
    at the end of training (0 disables regrowth); ``grad_correction`` (default: on for N:M only);
    ``nm`` is one (N, M) per sub-network, whose sparsities 1 - N/M must equal ``sparsity``.
    """

    default_distribution: ClassVar[str] = "global"
    needs_total_steps: ClassVar[bool] = True

    def __init__(
        self,
        *,
        prune_window: Sequence[float] = (0.0, 0.7),
        unit: str = "fraction",
        update_every: int | None = None,
        update_offset: int | None = None,
        death_rate: float = 0.5,
        nested: bool = True,
        grad_correction: bool | None = None,
        inner_group_size: int | None = None,
        nm: Sequence[Sequence[int]] | None = None,
        nm_skip_incompatible: bool = False,
        share_first_bn: bool = True,
        **common,
    ) -> None:
        super().__init__(**common)
        levels = self.sparsity if isinstance(self.sparsity, list | tuple) else [self.sparsity]
        self.sparsities = [mask_ops.check_sparsity(s, "ast sparsity") for s in levels]
        if any(b <= a for a, b in zip(self.sparsities, self.sparsities[1:], strict=False)):
            raise ConfigError(
                "ast: sub-network sparsities must be given densest first and strictly "
                f"increasing, got {self.sparsities}"
            )
        self.num_subnets = k = len(self.sparsities)
        self.nm = check_nm(nm, self.sparsities, bool(nested))
        if len(prune_window) != 2:
            raise ConfigError(f"ast: prune_window needs (start, end), got {prune_window!r}")
        start, end = (self.steps_from(v, unit) for v in prune_window)
        if end > self.total_steps:
            raise ConfigError(f"ast: prune_window ends at step {end}, after the last step")
        if not 0.0 <= float(death_rate) <= 1.0:
            raise ConfigError(f"ast: death_rate must be in [0, 1], got {death_rate!r}")
        if update_every is None:
            update_every = reference_update_every(int(self.total_steps), k)
        offset = int(update_every) // k if update_offset is None else int(update_offset)
        group = k if inner_group_size is None else int(inner_group_size)
        if offset < 0 or group < 1:
            raise ConfigError("ast: update_offset must be >= 0 and inner_group_size >= 1")
        self.ramps = [Cubic(0.0, s, start, end) for s in self.sparsities]
        self.nm_ramp = Cubic(0.0, 1.0, start, end)  # fraction of N:M groups
        self.death_rate = Cosine(float(death_rate), self.total_steps)
        self.grids = [Every(int(update_every), i * offset + int(update_every)) for i in range(k)]
        self.update_every = int(update_every)
        self.nested = bool(nested)
        self.grad_correction = self.nm is not None if grad_correction is None else grad_correction
        self.inner_group_size = group
        self.nm_skip_incompatible = bool(nm_skip_incompatible)
        self.share_first_bn = bool(share_first_bn)
        for i in range(k):
            if self._first_update_from(i, end) > self.total_steps:
                raise ConfigError(
                    f"ast: sub-network {i} has no mask update between the end of prune_window "
                    f"(step {end}) and the last step ({self.total_steps}), so it would never "
                    "reach its sparsity; lower update_every/update_offset or end the window earlier"
                )
        # Training state, saved by state_dict.
        self.active = 0
        self.subnets: SubnetMasks | None = None
        self.ramp_done = [False] * k
        self.nm_fraction = [0.0] * k  # fraction of N:M groups at each sub-network's last update
        self.goals: list[dict[str, float]] = []  # per-tensor target sparsity of each sub-network
        self.prev_grad: dict[str, torch.Tensor] | None = None
        self._conflicts: torch.Tensor | int = 0
        self._grow_grad: dict[str, torch.Tensor] = {}
        self._bns: dict[str, SwitchableBatchNorm] = {}
        self._sp: Sparsifier | None = None

    @classmethod
    def prepare_model(cls, model: nn.Module, *, sparsity: float | list[float], **options) -> None:
        """Switchable BatchNorm, built before sharding: ``init_masks`` adopts these layers."""
        levels = sparsity if isinstance(sparsity, list | tuple) else [sparsity]
        make_switchable(model, len(levels), share_first=bool(options.get("share_first_bn", True)))

    # ---------------------------------------------------------------- schedule
    def training_subnet(self, t: int) -> int:
        """The sub-network optimizer step ``t`` (1-based) trains."""
        return (t - 1) % self.num_subnets

    def is_update_step(self, k: int, t: int) -> bool:
        """Sub-network ``k`` updates after its first own step at or after each grid point."""
        own = self.training_subnet(t) == k
        return own and any(self.grids[k](u) for u in range(t - self.num_subnets + 1, t + 1))

    def _first_update_from(self, k: int, t: int) -> int:
        grid = self.grids[k]
        point = grid.start + max(0, math.ceil((t - grid.start) / grid.freq)) * grid.freq
        return point + (k - (point - 1)) % self.num_subnets

    # ------------------------------------------------------------------- hooks
    def init_masks(self, sp: Sparsifier) -> None:
        """Dense masks for every sub-network; switchable BatchNorm put into ``sp.model``."""
        self._sp = sp
        sp.keep_masked_values(step_all=True)  # before any mask: no weight may be lost
        self._bns = make_switchable(
            sp.model, self.num_subnets, share_first=self.share_first_bn, optimizer=sp.optimizer
        )
        nm_layers = nm_compatible(sp.params, self.nm, self.nm_skip_incompatible) if self.nm else []
        if self.distribution == "global" and self.layer_sparsity:
            raise ConfigError(
                "ast: layer_sparsity overrides need distribution uniform or erk (the global "
                "ramp prunes every layer by one count)"
            )
        floors = {
            n: mask_ops.floor_count(p.numel(), self.min_density) for n, p in sp.params.items()
        }
        self.subnets = SubnetMasks(
            sp.params,
            self.num_subnets,
            nested=self.nested,
            nm=self.nm,
            nm_layers=nm_layers,
            floors=floors if self.distribution == "global" else None,
        )
        self.goals = [self._final_targets(sp, i) for i in range(self.num_subnets)]
        self._switch(sp, 0)
        log.info(
            "ast: %d sub-networks at sparsity %s, %d switchable BatchNorm layers",
            *(self.num_subnets, self.sparsities, len(self._bns)),
        )

    def before_step(self, sp: Sparsifier, t: int) -> bool:
        """Keep the dense gradient for a coming regrowth, mask the gradient, then correct it."""
        k = self.training_subnet(t)
        if self.active != k:
            raise SparsetrainError(
                f"ast: step {t} trains sub-network {k} but sub-network {self.active} is active; "
                "after evaluating with use_subnet(), call sp.method.resume_training(sp)"
            )
        grads = {n: p.grad for n, p in sp.params.items() if p.grad is not None}
        if self.needs_dense_grad(t):
            self._grow_grad = {n: sp.dense_grad(n).abs() for n in grads}
        if self.grad_correction:
            index, group = t - 1, self.inner_group_size
            previous = self.prev_grad if index % group != 0 and self.prev_grad else None
            keep = (index + 1) % group != 0  # the next step is in the same inner group
            self.prev_grad = {n: g.detach().clone() for n, g in grads.items()} if keep else None
            if previous is not None:
                fired = project_conflicting(grads, previous)
                if fired is not None:
                    self._conflicts = self._conflicts + fired
        return False

    def needs_dense_grad(self, t: int) -> bool:
        """Regrowth after step ``t`` ranks the gradient outside the mask."""
        k = self.training_subnet(t)
        return not self.nm and self.is_update_step(k, t) and self.death_rate(t) > 0

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Update the trained sub-network's mask on its grid, then switch to the next one."""
        if self.is_update_step(self.active, t):
            self._update(sp, self.active, t)
        self._grow_grad = {}
        self._switch(sp, t % self.num_subnets)

    # -------------------------------------------------------------- inference
    def subnet_index(self, which: int | float) -> int:
        """Index of a sub-network given by index (int) or by its sparsity (float)."""
        return subnet_index(which, self.sparsities)

    def use_subnet(self, sp: Sparsifier, index: int | float) -> None:
        """Switch masks and BatchNorm to one sub-network (by index or sparsity)."""
        self._switch(sp, self.subnet_index(index))

    def resume_training(self, sp: Sparsifier) -> None:
        """Switch back to the sub-network the next training step belongs to."""
        self._switch(sp, self.training_subnet(sp.step + 1))

    def subnet_masks(self, index: int | float) -> dict[str, torch.Tensor]:
        """Whole bool masks of one sub-network (copies; under FSDP an all-gather: call it on every
        rank)."""
        i = self.subnet_index(index)
        with self.subnets.whole():
            return {n: m.clone() for n, m in self.subnets.masks(i).items()}

    def subnet_sparsity(self, index: int | float) -> float:
        """Fraction of zeros of one sub-network over the sparse parameters (no communication)."""
        return self.subnets.sparsity(self.subnet_index(index))

    def nesting_overlap(self) -> list[float]:
        """Per sub-network after the first, the fraction of its weights inside the denser one's
        (under FSDP a collective: call it on every rank)."""
        return self.subnets.overlap()

    @property
    def conflicts(self) -> int:
        """How many times a sparse tensor's gradient was corrected (a conflicting pair)."""
        return int(self._conflicts)

    def export(
        self, sp: Sparsifier, subnet: int | float | None = None, **options: Any
    ) -> nn.Module:
        """A plain model of one sub-network (the active one by default): its masks baked into the
        weights and its BatchNorm copies put back as plain BatchNorm layers."""
        if options:
            raise ConfigError(f"ast: unknown export option(s) {', '.join(options)}; use subnet=")
        i = self.active if subnet is None else self.subnet_index(subnet)
        model = sp.baked_copy()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in self.subnet_masks(i).items():
                params[name].copy_(sp.dense_value(name) * mask)
        return restore_batchnorms(model, i)

    def after_training(self, run: TrainingRun) -> dict[str, Any]:
        """Evaluate every sub-network with its own masks and BatchNorm (``sparsetrain train``)."""
        sp = run.sparsifier
        results: dict[str, Any] = {}
        for i in range(self.num_subnets):
            self.use_subnet(sp, i)
            loss, acc = run.evaluate(run.model)
            results[f"subnet{i}_sparsity"] = self.subnet_sparsity(i)
            results[f"subnet{i}_test_loss"], results[f"subnet{i}_test_acc"] = loss, acc
            log.info(
                "ast sub-network %d (sparsity %.4f): test acc %.2f%%",
                i,
                *(results[f"subnet{i}_sparsity"], 100 * acc),
            )
        self.resume_training(sp)
        results["nesting_overlap"] = self.nesting_overlap()
        results["corrected_gradients"] = self.conflicts
        return results

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "sparsities": list(self.sparsities),
            "nm": None if self.nm is None else [list(p) for p in self.nm],
            "active": self.active,
            "stack": self.subnets.state_dict(),
            "ramp_done": list(self.ramp_done),
            "nm_fraction": list(self.nm_fraction),
            "goals": [dict(g) for g in self.goals],
            "prev_grad": None if self.prev_grad is None else dict(self.prev_grad),
            "conflicts": self.conflicts,
            "switchable_bn": list(self._bns),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        nm = None if self.nm is None else [list(p) for p in self.nm]
        if state.get("sparsities") != self.sparsities or state.get("nm") != nm:
            raise CheckpointError(
                f"ast state is for sub-networks {state.get('sparsities')} (nm {state.get('nm')}), "
                f"this run has {self.sparsities} (nm {nm})"
            )
        self.subnets.load_state_dict(state["stack"])
        self.active = int(state["active"])
        self.ramp_done = list(state["ramp_done"])
        self.nm_fraction = list(state["nm_fraction"])
        self.goals = [dict(g) for g in state["goals"]]
        prev = state.get("prev_grad")
        self.prev_grad = None if prev is None else {n: g.clone() for n, g in prev.items()}
        self._conflicts = int(state.get("conflicts", 0))
        set_active(self._bns.values(), self.active)
        loaded = self._sp.full_masks()
        if any(not torch.equal(loaded[n], m) for n, m in self.subnet_masks(self.active).items()):
            raise CheckpointError("ast state: the active sub-network's masks differ from sp's")

    # ---------------------------------------------------------------- internals
    def _switch(self, sp: Sparsifier, i: int) -> None:
        """No communication under FSDP: each rank hands over its own slices, counts known."""
        sp.set_masks(self.subnets.masks(i), self.subnets.counts(i))
        set_active(self._bns.values(), i)
        sp.targets = dict(self.goals[i])
        self.active = i

    def _update(self, sp: Sparsifier, k: int, t: int) -> None:
        if self.nm and self.ramp_done[k]:
            return  # N:M masks are frozen once the ramp is over
        with self.subnets.whole():  # one gather of the stacks for the whole update (FSDP)
            magnitude = {name: sp.dense_value(name).abs() for name in sp.params}
            if self.nm:
                self.nm_fraction[k] = self.nm_ramp(t)
                self.ramp_done[k] = t >= self.nm_ramp.end
                self.subnets.set_nm(k, magnitude, self.nm_fraction[k])
            else:
                if not self.ramp_done[k]:  # magnitude pruning along the ramp, until it ends
                    self.subnets.prune(k, magnitude, self._keep_counts(sp, self.ramps[k](t)))
                    self.ramp_done[k] = t >= self.ramps[k].end
                    if self.ramp_done[k] and self.distribution == "global":
                        masks = self.subnets.masks(k)
                        self.goals[k] = {
                            n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()
                        }
                if self._grow_grad:
                    self.subnets.regrow(k, magnitude, self._grow_grad, self.death_rate(t))
            if self.nested:
                self.subnets.repair_from(
                    k + 1,
                    magnitude,
                    global_count=self.distribution == "global",
                    nm_fractions=self.nm_fraction,
                )

    def _keep_counts(self, sp: Sparsifier, sparsity: float) -> int | dict[str, int]:
        """Weights to keep: one global count, or per tensor from the distribution."""
        if self.distribution == "global":
            return mask_ops.n_keep(sum(p.numel() for p in sp.params.values()), sparsity)
        targets = self.layer_targets(sp, sparsity)
        return {n: mask_ops.n_keep(p.numel(), targets[n]) for n, p in sp.params.items()}

    def _final_targets(self, sp: Sparsifier, i: int) -> dict[str, float]:
        if self.nm:
            n, m = self.nm[i]
            dense = set(sp.params) - set(self.subnets.nm_layers)
            return {name: 0.0 if name in dense else 1.0 - n / m for name in sp.params}
        if self.distribution == "global":
            scores = {name: sp.weight(name).abs() for name in sp.params}
            masks = self.global_masks(sp, scores, self.sparsities[i])
            return {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()}
        return self.layer_targets(sp, self.sparsities[i])
