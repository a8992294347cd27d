"""DSR: allocation, pruning/regrowth invariants, threshold control, schedule, resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain.errors import ConfigError
from sparsetrain.methods.dsr import PeriodSchedule, allocate_regrowth, paper_dense_names
from tests.conftest import TinyCNN


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20, bias=False), nn.Linear(20, 10, bias=False))


def _dsr(model, sparsity=0.5, total_steps=100, steps_per_epoch=10, seed=0, **options):
    """DSR on ``model``; the toy models here reparameterize every layer unless told otherwise."""
    options = {"paper_dense_layers": False, **options}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = st.sparsify(
        model,
        opt,
        method="dsr",
        sparsity=sparsity,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        **options,
    )
    return sp, opt


def _train(model, opt, steps, seed=0):
    g = _gen(seed)
    for _ in range(steps):
        x = torch.randn(16, 1, 16, 16, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _active(sp) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in sp.masks.items()}


def _set_active_weights(sp, name, value, small=()):
    """Every active weight of ``name`` becomes ``value``, except flat indices ``small`` -> 1e-4."""
    with torch.no_grad():
        param = sp.params[name]
        param.copy_(sp.mask(name).float() * value)
        param.view(-1)[list(small)] = 1e-4


# ------------------------------------------------------------------ allocation
def test_allocation_is_proportional_to_survivors():
    out = allocate_regrowth({"a": 1, "b": 3}, {"a": 100, "b": 100}, 8, _gen())
    assert out == {"a": 2, "b": 6}


def test_allocation_full_tensor_takes_what_fits_and_rest_is_split_again():
    # Shares 4.2 / 4.2 / 12.6: b holds 1, the other 20 go 2:6 to a and c.
    out = allocate_regrowth({"a": 2, "b": 2, "c": 6}, {"a": 100, "b": 1, "c": 100}, 21, _gen())
    assert out == {"a": 5, "b": 1, "c": 15}


def test_allocation_remainder_goes_to_one_random_tensor():
    lucky = set()
    for seed in range(20):
        out = allocate_regrowth(dict.fromkeys("abc", 1), dict.fromkeys("abc", 10), 5, _gen(seed))
        assert sorted(out.values()) == [1, 1, 3]
        lucky.add(max(out, key=out.get))
    assert lucky == {"a", "b", "c"}


def test_allocation_never_exceeds_capacity_and_sums_exactly():
    g = _gen(1)
    for _ in range(200):
        n = int(torch.randint(1, 6, (1,), generator=g))
        names = [f"t{i}" for i in range(n)]
        survivors = {k: int(torch.randint(0, 50, (1,), generator=g)) for k in names}
        capacity = {k: int(torch.randint(0, 30, (1,), generator=g)) for k in names}
        total = int(torch.randint(0, sum(capacity.values()) + 1, (1,), generator=g))
        out = allocate_regrowth(survivors, capacity, total, g)
        assert sum(out.values()) == total
        assert all(0 <= out[k] <= capacity[k] for k in names)


def test_allocation_without_survivors_splits_evenly():
    assert allocate_regrowth({"a": 0, "b": 0}, {"a": 5, "b": 5}, 4, _gen()) == {"a": 2, "b": 2}


def test_allocation_without_room_raises():
    with pytest.raises(ConfigError, match="only 3 inactive positions"):
        allocate_regrowth({"a": 5, "b": 5}, {"a": 1, "b": 2}, 4, _gen())


# --------------------------------------------------------------- the method
def test_init_is_uniform_and_random_per_tensor():
    sp, _ = _dsr(_two_layers(), sparsity=0.75)
    assert _active(sp) == {"0.weight": 50, "1.weight": 50}
    assert set(sp.targets.values()) == {0.75}
    other, _ = _dsr(_two_layers(), sparsity=0.75, seed=1)
    assert not torch.equal(sp.masks["0.weight"], other.masks["0.weight"])


def test_reparameterize_moves_weights_without_changing_the_total():
    model = _two_layers()
    sp, opt = _dsr(model)  # 100 of 200 active in each layer
    x = torch.randn(8, 10)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()  # momentum buffers now exist and are non-zero
    before = sp.masks
    small = torch.nonzero(before["0.weight"].view(-1)).flatten()[:10].tolist()
    _set_active_weights(sp, "0.weight", 1.0, small)
    _set_active_weights(sp, "1.weight", 1.0)
    momentum_before = {n: opt.state[p]["momentum_buffer"].clone() for n, p in sp.params.items()}

    pruned = sp.method.reparameterize(sp, 5)

    after = sp.masks
    assert pruned == 10
    assert sum(_active(sp).values()) == 200
    assert not after["0.weight"].view(-1)[small].any()  # pruned and not regrown
    # Survivors 90 and 100 share the 10 regrown weights 4.7 / 5.3: floors 4 and 5, one remainder.
    grown = {n: int((after[n] & ~before[n]).sum()) for n in after}
    assert grown["0.weight"] in (4, 5) and sum(grown.values()) == 10
    for name, param in sp.params.items():
        new = after[name] & ~before[name]
        kept = after[name] & before[name]
        momentum = opt.state[param]["momentum_buffer"]
        assert torch.all(param[new] == 0)
        assert torch.all(momentum[new] == 0)
        assert torch.equal(momentum[kept], momentum_before[name][kept])  # not reset


@pytest.mark.parametrize("step", range(1, 6))
def test_never_regrows_a_just_pruned_position(step):
    # 190 of 200 active per layer: 10 free slots each, as many as the 10 pruned positions, so a
    # growth that did not exclude the pruned ones would almost surely pick some.
    sp, _ = _dsr(_two_layers(), sparsity=0.05)
    small = torch.nonzero(sp.mask("0.weight").view(-1)).flatten()[:10].tolist()
    _set_active_weights(sp, "0.weight", 1.0, small)
    _set_active_weights(sp, "1.weight", 1.0)
    sp.method.reparameterize(sp, step)
    assert not sp.mask("0.weight").view(-1)[small].any()
    assert sum(_active(sp).values()) == 380


@pytest.mark.parametrize(
    ("n_small", "factor"), [(12, 0.5), (11, 1.0), (10, 1.0), (9, 1.0), (8, 2.0), (0, 2.0)]
)
def test_threshold_halves_doubles_or_stays(n_small, factor):
    sp, _ = _dsr(_two_layers(), target_prune=10, tolerance=0.1, threshold=1e-3)
    active = torch.nonzero(sp.mask("0.weight").view(-1)).flatten()[:n_small].tolist()
    _set_active_weights(sp, "0.weight", 1.0, active)
    _set_active_weights(sp, "1.weight", 1.0)
    assert sp.method.reparameterize(sp, 1) == n_small
    assert sp.method.threshold == pytest.approx(1e-3 * factor)


def test_never_empties_a_tensor_keeps_its_largest_weight():
    sp, _ = _dsr(_two_layers(), threshold=1.0)
    mask = sp.mask("0.weight")
    values = torch.rand(mask.shape, generator=_gen()) * 0.5  # all below H
    with torch.no_grad():
        sp.params["0.weight"].copy_(values * mask)
    _set_active_weights(sp, "1.weight", 2.0)
    largest = int(torch.argmax(values * mask))
    sp.method.reparameterize(sp, 1)
    assert sp.mask("0.weight").view(-1)[largest]
    assert sp.params["0.weight"].view(-1)[largest] == values.view(-1)[largest]
    survivors = sp.mask("0.weight") & mask
    assert int(survivors.sum()) == 1
    assert sum(_active(sp).values()) == 200


def test_no_room_to_regrow_is_a_clear_error():
    sp, _ = _dsr(_two_layers(), sparsity=0.1, threshold=10.0)  # 180 active, 20 free
    with pytest.raises(ConfigError, match="raise the sparsity"):
        sp.method.reparameterize(sp, 1)


def _record(sp) -> list[int]:
    steps, inner = [], sp.method.reparameterize

    def spy(sparsifier, t):
        steps.append(t)
        return inner(sparsifier, t)

    sp.method.reparameterize = spy
    return steps


def test_period_schedule_and_stop():
    model = TinyCNN()
    sp, opt = _dsr(
        model,
        periods=[2, 4],
        period_starts=[0, 1],
        stop=3,
        unit="epochs",
        steps_per_epoch=4,
        total_steps=20,
        threshold=0.02,
    )
    steps = _record(sp)
    _train(model, opt, 12)
    frozen = sp.masks
    _train(model, opt, 8)
    assert steps == [2, 4, 8, 12]  # P = 2 in epoch 0, then 4; none after epoch 3 (step 12)
    assert all(torch.equal(frozen[n], m) for n, m in sp.masks.items())


def test_period_schedule_lookup():
    schedule = PeriodSchedule((100, 200, 400), (0, 250, 250))
    assert [schedule(t) for t in (1, 250, 251)] == [100, 100, 400]
    with pytest.raises(ConfigError, match="begin at 0"):
        PeriodSchedule((100, 200), (5, 10))
    with pytest.raises(ConfigError, match="same length"):
        PeriodSchedule((100, 200), (0,))


def test_per_layer_sparsity_drifts_while_total_holds():
    model = TinyCNN()
    sp, opt = _dsr(
        model,
        sparsity=0.8,
        periods=[5],
        period_starts=[0],
        stop=None,
        threshold=0.02,
        total_steps=40,
    )
    start = _active(sp)
    _train(model, opt, 40)
    end = _active(sp)
    assert sp.method.reparameterizations == 8
    assert sum(end.values()) == sum(start.values())
    assert end != start


def test_resume_repeats_the_uninterrupted_run():
    def build():
        torch.manual_seed(0)
        model = TinyCNN()
        sp, opt = _dsr(
            model,
            sparsity=0.8,
            periods=[3, 5],
            period_starts=[0, 0.5],
            stop=0.9,
            threshold=0.02,
            total_steps=40,
        )
        return model, sp, opt

    model, sp, opt = build()
    _train(model, opt, 17)
    saved = copy.deepcopy((sp.state_dict(), model.state_dict(), opt.state_dict()))
    _train(model, opt, 23, seed=1)

    model2, sp2, opt2 = build()
    sp2.load_state_dict(saved[0])
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    _train(model2, opt2, 23, seed=1)
    assert sp2.method.state_dict() == sp.method.state_dict()
    for name, mask in sp.masks.items():
        assert torch.equal(sp2.masks[name], mask)
        assert torch.equal(sp2.params[name], sp.params[name])


class _WrnLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(4, 8, 1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.fc((self.conv(x) + self.shortcut(x)).mean(dim=(2, 3)))


def test_paper_dense_layers_stay_dense_by_default_or_can_be_reparameterized():
    model = _WrnLike()
    shapes = {n: p.shape for n, p in model.named_parameters() if p.dim() >= 2}
    dense = ["stem.weight", "shortcut.weight", "fc.weight"]
    assert paper_dense_names(shapes) == dense
    off, _ = _dsr(_WrnLike(), sparsity=0.9)
    assert off.method.names == list(shapes) and set(off.targets.values()) == {0.9}
    default = st.sparsify(_WrnLike(), None, method="dsr", sparsity=0.9, total_steps=100)
    assert default.method.names == ["conv.weight"]
    sp, opt = _dsr(
        model, sparsity=0.9, paper_dense_layers=True, periods=[2], period_starts=[0], threshold=0.05
    )
    assert sp.method.names == ["conv.weight"]
    assert sp.targets == {
        "stem.weight": 0.0,
        "conv.weight": 0.9,
        "shortcut.weight": 0.0,
        "fc.weight": 0.0,
    }
    assert sp.method.target_prune == round(0.0138 * 288)
    _train(model, opt, 6)
    assert all(bool(sp.mask(n).all()) for n in dense)
    assert _active(sp)["conv.weight"] == 29


def test_target_prune_absolute_or_fraction():
    sp, _ = _dsr(_two_layers())
    assert sp.method.target_prune == round(0.0138 * 400)
    sp, _ = _dsr(_two_layers(), target_prune_fraction=0.1)
    assert sp.method.target_prune == 40
    sp, _ = _dsr(_two_layers(), target_prune=7, target_prune_fraction=0.1)
    assert sp.method.target_prune == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 0.0}, "sparsity in \\(0, 1\\)"),
        ({"target_prune": 0}, "target_prune"),
        ({"periods": [100, 0], "period_starts": [0, 0.5]}, "positive integers"),
        ({"total_steps": None}, "need total_steps"),
        ({"unit": "hours"}, "unknown length unit"),
    ],
)
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _dsr(_two_layers(), **kwargs)


def test_models_without_convolutions_keep_every_weight_reparameterized():
    shapes = {"fc1.weight": torch.Size([300, 784]), "fc2.weight": torch.Size([10, 300])}
    assert paper_dense_names(shapes) == []
    sp = st.sparsify(_two_layers(), None, method="dsr", sparsity=0.9, total_steps=100)
    assert sp.method.names == list(sp.params)
