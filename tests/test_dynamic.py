"""SET and RigL: drop/grow semantics, schedules, hand-built cases and exact resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.schedules import Cosine
from tests.conftest import TinyCNN

TOTAL = 60


def _batches(n: int = TOTAL):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(n)
    ]


def _build(method: str, optimizer: str = "sgd", seed: int = 0, **options):
    torch.manual_seed(0)
    model = TinyCNN()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kwargs = dict(sparsity=0.8, total_steps=TOTAL, steps_per_epoch=10, update_every=10, seed=seed)
    kwargs.update(options)
    return model, opt, st.sparsify(model, opt, method=method, **kwargs)


def _step(model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def _train(method: str, optimizer: str = "sgd", steps: int = TOTAL, **options):
    """Masks, weights and optimizer state after every step (index 0: before training)."""
    model, opt, sp = _build(method, optimizer, **options)
    masks, weights, states = [sp.masks], [_weights(sp)], [{}]
    for batch in _batches(steps):
        _step(model, opt, batch)
        masks.append(sp.masks)
        weights.append(_weights(sp))
        states.append({n: _state(opt, p) for n, p in sp.params.items()})
    return sp, masks, weights, states


def _weights(sp):
    return {n: p.detach().clone() for n, p in sp.params.items()}


def _state(opt, param):
    return {k: v.clone() for k, v in opt.state[param].items() if v.shape == param.shape}


@pytest.mark.parametrize(
    ("method", "optimizer"), [("set", "sgd"), ("rigl", "sgd"), ("rigl", "adamw")]
)
def test_drop_grow_invariants_in_training(method, optimizer):
    sp, masks, weights, states = _train(method, optimizer)
    counts = {n: int(m.sum()) for n, m in masks[0].items()}
    changed_steps = set()
    for t in range(1, TOTAL + 1):
        for name, new in masks[t].items():
            old = masks[t - 1][name]
            assert int(new.sum()) == counts[name], "per-layer active count changed"
            grown = new & ~old
            if grown.any():
                changed_steps.add(t)
                assert bool((weights[t][name][grown] == 0).all()), "grown weight is not 0"
                for key, state in states[t][name].items():
                    assert bool((state[grown] == 0).all()), f"grown {key} is not 0"
            assert int((old & ~new).sum()) == int(grown.sum())
    assert changed_steps and changed_steps <= {10, 20, 30, 40, 50, 60}
    if method == "rigl":
        assert max(changed_steps) <= 45, "RigL updated after its end (0.75 of training)"
        assert sp.method.dense_gradient_steps == 4
        assert sp.state_dict()["method_state"]["dense_gradient_steps"] == 4
    else:
        assert sp.method.dense_gradient_steps == 0


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_drop_fraction_follows_schedule(method, monkeypatch):
    model, opt, sp = _build(method, drop_schedule="cosine", end=0.75)
    schedule = Cosine(0.3, end=45)
    calls = []
    policy = sp.method
    original_drop, original_grow = policy.drop, policy.grow_score

    def spy_drop(weight, mask, fraction):
        kept = original_drop(weight, mask, fraction)
        calls.append((int(mask.sum()), fraction, int(kept.sum())))
        return kept

    inactive_scores = []

    def spy_grow(sp_, name, t):
        score = original_grow(sp_, name, t)
        inactive_scores.append(float(score[~sp_.mask(name)].abs().sum()))
        return score

    monkeypatch.setattr(policy, "drop", spy_drop)
    monkeypatch.setattr(policy, "grow_score", spy_grow)
    seen = []
    for t, batch in enumerate(_batches(), start=1):
        before = len(calls)
        _step(model, opt, batch)
        if len(calls) > before:
            seen.append(t)
            for active, fraction, kept in calls[before:]:
                assert fraction == pytest.approx(schedule(t))
                assert active - kept == mask_ops.n_drop(active, schedule(t))
    assert seen == [10, 20, 30, 40]
    # The grow score at inactive positions is not zero: RigL reads the unmasked gradient.
    assert min(inactive_scores) > 0


def test_no_update_after_end_and_skip_can_be_disabled():
    _, masks, _, _ = _train("rigl", end=25, unit="steps")
    assert all(
        torch.equal(masks[t][n], masks[20][n]) for t in range(21, TOTAL + 1) for n in masks[t]
    )
    assert any(not torch.equal(masks[20][n], masks[0][n]) for n in masks[0])


def _one_layer_rigl(grad: torch.Tensor, **options):
    model = nn.Linear(4, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.sparsify(
        model,
        opt,
        method="rigl",
        sparsity=0.5,
        total_steps=100,
        distribution="uniform",
        update_every=1,
        alpha=0.25,
        drop_schedule="constant",
        **options,
    )
    sp.set_mask("weight", torch.tensor([[True, True, False, False], [True, False, True, False]]))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, -0.7, 0.0]]))
    model.weight.grad = grad.clone()
    opt.step()
    return sp, model


def test_rigl_keeps_the_first_layer_dense_under_uniform_only_as_the_reference():
    def build(**options):
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return st.sparsify(model, opt, method="rigl", sparsity=0.9, total_steps=60, **options)

    uniform = build(distribution="uniform")
    assert uniform.targets == {**dict.fromkeys(uniform.params, 0.9), "conv1.weight": 0.0}
    assert bool(uniform.mask("conv1.weight").all())
    assert build(distribution="uniform", dense_first_layer=False).targets["conv1.weight"] == 0.9
    assert build().targets == build(dense_first_layer=False).targets  # ERK: no layer forced dense
    assert build(dense_first_layer=True).targets["conv1.weight"] == 0.0


def test_rigl_grows_where_the_dense_gradient_is_largest():
    grad = torch.tensor([[0.2, 0.05, 0.9, -0.4], [0.1, -1.5, 0.3, 0.6]])
    sp, model = _one_layer_rigl(grad)
    # Drop -0.1 (smallest |w|), grow position (1, 1) where |grad| = 1.5 is largest among the rest.
    assert sp.mask("weight").tolist() == [[True, False, False, False], [True, True, True, False]]
    # The optimizer update of the mask-update step was skipped: kept weights are unchanged.
    expected = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.3, 0.0, -0.7, 0.0]])
    assert torch.equal(model.weight.detach(), expected)
    assert sp.method.dense_gradient_steps == 1


def test_rigl_regrowing_a_just_dropped_weight_keeps_its_value():
    grad = torch.tensor([[0.2, 5.0, 0.9, -0.4], [0.1, -1.5, 0.3, 0.6]])
    sp, model = _one_layer_rigl(grad)
    assert sp.mask("weight").tolist() == [[True, True, False, False], [True, False, True, False]]
    assert model.weight[0, 1].item() == pytest.approx(-0.1)


def test_rigl_without_skip_applies_the_step():
    grad = torch.tensor([[0.2, 0.05, 0.9, -0.4], [0.1, -1.5, 0.3, 0.6]])
    sp, model = _one_layer_rigl(grad, skip_update_step=False)
    # The step runs with the new mask: kept weights move by -lr * grad; the grown weight (1, 1)
    # starts at 0 with the new mask applied to its gradient, so it moves from the next step on.
    expected = torch.tensor([[0.48, 0.0, 0.0, 0.0], [0.29, 0.0, -0.73, 0.0]])
    torch.testing.assert_close(model.weight.detach(), expected)


@pytest.mark.parametrize(("signed", "droppable"), [(True, {0, 4}), (False, {0, 1})])
def test_set_drop_rule_hand_built(signed, droppable):
    model = nn.Linear(5, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, -0.5], [-0.6, -0.7, -0.8, 0.0, 0.0]])
    old = torch.tensor([[True] * 5, [True, True, True, False, False]])
    changed = 0
    for seed in range(4):
        sp = st.sparsify(
            model,
            opt,
            method="set",
            sparsity=0.2,
            distribution="uniform",
            zeta=0.25,
            update_every=1,
            signed=signed,
            seed=seed,
        )
        sp.set_mask("weight", old)
        with torch.no_grad():
            model.weight.copy_(values)
        sp.method.after_step(sp, 1)
        new = sp.mask("weight")
        removed = {int(i) for i in torch.nonzero((old & ~new).flatten()).flatten()}
        assert removed <= droppable and int(new.sum()) == 8
        assert torch.equal(model.weight.detach()[old & new], values[old & new])
        assert bool((model.weight.detach()[new & ~old] == 0).all())
        changed += bool(removed)
        sp.detach()  # the next seed's sparsifier takes over the same optimizer
    assert changed, "no seed rewired anything: the test would be vacuous"


def test_set_random_growth_is_seeded():
    runs = [_train("set", steps=10, seed=s)[1][-1] for s in (0, 0, 1)]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_set_per_epoch_updates_once_an_epoch():
    _, _, sp = _build("set", per_epoch=True, steps_per_epoch=15)
    # Not after the last epoch: the original leaves the final connectivity alone.
    assert [t for t in range(1, TOTAL + 1) if sp.method.is_update_step(t)] == [15, 30, 45]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("set", {"per_epoch": True}),
        ("set", {"update_every": 20}),
        ("rigl", {"drop_schedule": "constant", "end": 1.0, "update_every": 20}),
    ],
)
def test_no_rewiring_at_the_last_step(method, options):
    """Weights grown after the last optimizer step would stay 0 in the trained model."""
    sp, masks, _, _ = _train(method, **options)
    assert not sp.method.is_update_step(TOTAL)
    assert all(torch.equal(mask, masks[-2][name]) for name, mask in masks[-1].items())
    assert any(not torch.equal(masks[-2][n], masks[0][n]) for n in masks[0])  # it did rewire


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_resume_is_exact(method):
    batches = _batches()
    model, opt, sp = _build(method)
    for batch in batches:
        _step(model, opt, batch)

    half_model, half_opt, half_sp = _build(method)
    for batch in batches[:35]:
        _step(half_model, half_opt, batch)
    saved = copy.deepcopy((half_sp.state_dict(), half_model.state_dict(), half_opt.state_dict()))

    torch.manual_seed(7)
    new_model, new_opt, new_sp = _build(method, seed=0)
    new_sp.load_state_dict(saved[0])
    new_model.load_state_dict(saved[1])
    new_opt.load_state_dict(saved[2])
    for batch in batches[35:]:
        _step(new_model, new_opt, batch)
    for name in sp.params:
        assert torch.equal(new_sp.masks[name], sp.masks[name])
        assert torch.equal(new_sp.params[name], sp.params[name])
    assert new_sp.method.dense_gradient_steps == sp.method.dense_gradient_steps


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("set", {"drop_schedule": "cosine"}),
        ("set", {"zeta": 0.0}),
        ("set", {"zeta": 1.5}),
        ("set", {"drop_schedule": "linear", "end": 0.5}),
        ("set", {"update_every": 0}),
        ("set", {"alpha": 0.3}),
        ("rigl", {"end": 2.0}),
        ("rigl", {"zeta": 0.3}),
        ("rigl", {"signed": True}),
    ],
)
def test_bad_options_raise(method, options):
    with pytest.raises(ConfigError):
        _build(method, **options)


def test_needs_lengths_it_can_resolve():
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="total_steps"):
        st.sparsify(model, opt, method="rigl", sparsity=0.9)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        st.sparsify(model, opt, method="set", sparsity=0.9, per_epoch=True)
    sp = st.sparsify(model, opt, method="set", sparsity=0.9)  # constant zeta, no end: no lengths
    assert sp.method.updates.stop is None
    assert sp.method.distribution == "erk"
