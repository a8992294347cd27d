"""GMP: the cubic ramp at every update step, magnitude order, no regrowth, frozen after the end."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.schedules import Cubic
from tests.conftest import TinyCNN

TOTAL = 60


def _train(steps: int = TOTAL, **kwargs):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = dict(sparsity=0.8, total_steps=TOTAL, frequency=10, start=0.1, end=0.75)
    options.update(kwargs)
    sp = st.sparsify(model, opt, method="gmp", **options)
    g = torch.Generator().manual_seed(0)
    history = [sp.masks]
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 1, 16, 16, generator=g)
        F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=g)).backward()
        opt.step()
        history.append(sp.masks)
    return sp, history


def _active(masks: dict) -> dict:
    return {name: int(m.sum()) for name, m in masks.items()}


def test_layer_scope_follows_the_cubic_ramp_and_freezes():
    sp, history = _train(initial_sparsity=0.2)
    ramp = Cubic(0.2, 0.8, start=6, end=45)
    updates = {6, 16, 26, 36, 45}
    assert sp.method.ramp == ramp
    for t in range(1, TOTAL + 1):
        before, after = history[t - 1], history[t]
        for name, p in sp.params.items():
            assert not bool((after[name] & ~before[name]).any()), "a pruned weight came back"
            if t < 6:
                assert bool(after[name].all()), "pruning started before start"
            elif t in updates:
                assert int(after[name].sum()) == mask_ops.n_keep(p.numel(), ramp(t))
            else:
                assert torch.equal(after[name], before[name]), f"mask changed off-grid at {t}"
    for name, p in sp.params.items():
        assert int(history[-1][name].sum()) == mask_ops.n_keep(p.numel(), 0.8)
    sparsities = [
        1 - sum(_active(h).values()) / sum(p.numel() for p in sp.params.values()) for h in history
    ]
    assert all(a <= b for a, b in zip(sparsities, sparsities[1:], strict=False))
    assert sp.targets == dict.fromkeys(sp.params, 0.8)


def test_starts_dense_with_final_targets():
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="gmp", sparsity=0.9, total_steps=1000, distribution="erk")
    assert all(bool(m.all()) for m in sp.masks.values())
    assert sp.targets == st.distributions.erk({n: p.shape for n, p in sp.params.items()}, 0.9)


def test_erk_layers_reach_their_own_targets():
    sp, history = _train(distribution="erk")
    for name, p in sp.params.items():
        assert int(history[-1][name].sum()) == mask_ops.n_keep(p.numel(), sp.targets[name])


def test_global_scope_prunes_one_top_k():
    sp, history = _train(scope="global")
    ramp = Cubic(0.0, 0.8, start=6, end=45)
    total = sum(p.numel() for p in sp.params.values())
    for t in (16, 26, 36, 45):
        assert sum(_active(history[t]).values()) == mask_ops.n_keep(total, ramp(t))
    final = history[-1]
    assert sum(_active(final).values()) == mask_ops.n_keep(total, 0.8)
    # Per-layer sparsities differ under a global ranking; the targets report the achieved split.
    assert sp.targets == {n: 1 - float(m.sum()) / m.numel() for n, m in final.items()}
    for t in range(1, TOTAL + 1):
        for name in final:
            assert not bool((history[t][name] & ~history[t - 1][name]).any())


def _hand_built(scope: str):
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.1, 0.3, -0.8], [0.05, 0.6, -0.2, 0.0]]))
        model[1].weight.copy_(torch.tensor([[0.9, -0.7], [0.01, 0.4]]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(
        model,
        opt,
        method="gmp",
        sparsity=0.5,
        total_steps=10,
        start=0.0,
        end=1.0,
        frequency=10,
        scope=scope,
    )
    sp.method.after_step(sp, 10)  # the end step: prune straight to 0.5
    return sp


def test_layer_scope_prunes_smallest_magnitudes_hand_built():
    masks = _hand_built("layer").masks
    # Layer 0 keeps 4 of 8: 0.8, 0.6, 0.5, 0.3; layer 1 keeps 2 of 4: 0.9, 0.7.
    assert masks["0.weight"].tolist() == [[True, False, True, True], [False, True, False, False]]
    assert masks["1.weight"].tolist() == [[True, True], [False, False]]


def test_global_scope_prunes_smallest_magnitudes_hand_built():
    masks = _hand_built("global").masks
    # The 6 largest of all 12 magnitudes: 0.9, 0.8, 0.7, 0.6, 0.5, 0.4.
    assert masks["0.weight"].tolist() == [[True, False, False, True], [False, True, False, False]]
    assert masks["1.weight"].tolist() == [[True, True], [False, True]]


def test_state_round_trip_keeps_final_targets():
    sp, _ = _train(steps=20, distribution="global")
    state = sp.state_dict()
    assert state["method_state"]["final_targets"] == sp.targets
    torch.manual_seed(1)
    model = TinyCNN()
    fresh = st.sparsify(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="gmp",
        sparsity=0.8,
        total_steps=TOTAL,
        frequency=10,
        distribution="global",
    )
    fresh.load_state_dict(state)
    assert fresh.method.final_targets == sp.method.final_targets


@pytest.mark.parametrize(
    "options",
    [
        {"scope": "channel"},
        {"initial_sparsity": 0.9},
        {"end": 2.0},
        {"start": 0.8, "end": 0.5},
        {"frequency": 0},
        {"unit": "years"},
        {"frequncy": 10},
    ],
)
def test_bad_options_raise(options):
    model = TinyCNN()
    with pytest.raises(ConfigError):
        st.sparsify(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            method="gmp",
            sparsity=0.8,
            total_steps=100,
            **options,
        )


def test_fractions_need_total_steps():
    model = TinyCNN()
    with pytest.raises(ConfigError, match="total_steps"):
        st.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method="gmp", sparsity=0.8)
    sp = st.sparsify(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="gmp",
        sparsity=0.8,
        start=100,
        end=500,
        unit="steps",
    )
    assert sp.method.ramp == Cubic(0.0, 0.8, 100, 500)
