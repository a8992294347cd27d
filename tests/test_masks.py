"""The Sparsifier mechanism: masks enforced on weights, gradients and optimizer state."""

import pytest
import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.masks import Sparsifier
from tests.conftest import TinyCNN, tiny_mlp


def _train(model, opt, batches, steps):
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, fused=True),
    ],
    ids=["sgd", "nesterov", "adam", "adamw", "sgd-fused", "adamw-fused"],
)
def test_exact_sparsity_after_50_steps(make_opt, batches):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = make_opt(model.parameters())
    sp = st.sparsify(model, opt, method="static", sparsity=0.9)
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    _train(model, opt, batches, 50)
    for name, mask in sp.masks.items():
        param = sp.params[name]
        assert int(mask.sum()) == counts[name] == round(0.1 * param.numel())
        assert torch.all(param[~mask] == 0)
        assert int((param != 0).sum()) == counts[name]  # kept weights really trained (non-zero)
        for state in opt.state[param].values():
            if state.shape == param.shape:
                assert torch.all(state[~mask] == 0)
    assert sp.sparsity == pytest.approx(0.9, abs=1e-3)


def test_gradients_are_masked_before_the_step(batches):
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.8)
    seen = {}

    def capture(optimizer, args, kwargs):
        seen.update({n: p.grad.clone() for n, p in sp.params.items()})

    opt.register_step_pre_hook(capture)  # runs after the sparsifier's own pre-hook
    x, y = batches[0]
    F.cross_entropy(model(x.flatten(1)), y).backward()
    opt.step()
    for name, mask in sp.masks.items():
        assert torch.all(seen[name][~mask] == 0)
        assert seen[name][mask].abs().sum() > 0


def test_set_mask_regrows_at_zero_with_zero_state(batches):
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.sparsify(model, opt, method="static", sparsity=0.5)
    _train(model, opt, [(x.flatten(1), y) for x, y in batches], 5)
    name = "1.weight"
    old = sp.mask(name)
    new = ~old  # swap: every active weight dropped, every inactive grown
    sp.set_mask(name, new)
    param, momentum = sp.params[name], opt.state[sp.params[name]]["momentum_buffer"]
    assert torch.all(param == 0) and torch.all(momentum == 0)
    assert sp.density(name) == pytest.approx(0.5)


def test_reset_optimizer_state_works_with_grads_none(batches):
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = st.sparsify(model, opt, method="static", sparsity=0.5)
    _train(model, opt, [(x.flatten(1), y) for x, y in batches], 3)
    opt.zero_grad()  # grads are None now
    sp.reset_optimizer_state()
    for param in sp.params.values():
        assert torch.all(opt.state[param]["exp_avg"] == 0)
        assert torch.all(opt.state[param]["exp_avg_sq"] == 0)


def test_kept_values_mode_restores_masked_values():
    torch.manual_seed(0)
    model = tiny_mlp()
    sp = Sparsifier(model, {"1.weight": model[1].weight})
    original = model[1].weight.detach().clone()
    sp.keep_masked_values()
    half = torch.zeros_like(original, dtype=torch.bool)
    half[:10] = True
    sp.set_mask("1.weight", half)
    assert torch.all(model[1].weight[10:] == 0)
    sp.set_mask("1.weight", torch.ones_like(half))
    assert torch.equal(model[1].weight.detach(), original)


def test_export_is_plain_and_strict_loadable(batches):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = st.sparsify(model, opt, method="static", sparsity=0.9)
    _train(model, opt, batches, 5)
    plain = sp.export()
    assert not plain._forward_pre_hooks
    fresh = TinyCNN()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    x = batches[0][0]
    assert torch.equal(fresh(x), model(x))


def test_masks_keyed_by_fully_qualified_name(tiny_cnn):
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.1)
    sp = st.sparsify(tiny_cnn, opt, method="static", sparsity=0.5)
    assert list(sp.masks) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert all(m.dtype == torch.bool for m in sp.masks.values())


def test_list_methods_contains_baselines():
    assert {"dense", "static"} <= set(st.list_methods())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "static", "sparsity": 1.5}, "sparsity must be in"),
        ({"method": "static", "sparsity": -0.1}, "sparsity must be in"),
        ({"method": "static", "sparsity": 1.0}, "sparsity must be in"),
        ({"method": "static", "sparsity": "lots"}, "sparsity must be a number"),
        ({"method": "magic", "sparsity": 0.5}, "unknown method 'magic'"),
        ({"method": "static", "sparsity": 0.5, "speed": 3}, "unknown option.*'speed'"),
        ({"method": "static", "sparsity": 0.5, "distribution": "normal"}, "unknown distribution"),
        (
            {"method": "static", "sparsity": 0.5, "exclude": ["nope.*"]},
            "'nope.\\*' matches no parameter",
        ),
        ({"method": "dense", "sparsity": 0.5}, "sparsity must be 0"),
        ({"method": "static", "sparsity": 0.5, "total_steps": 0}, "total_steps must be a positive"),
        (
            {"sparsity": 0.5, "total_steps": "abc"},
            "total_steps must be an integer or None, got 'abc'",
        ),
        ({"sparsity": 0.5, "steps_per_epoch": 2.5}, "steps_per_epoch must be an integer"),
        ({"sparsity": 0.5, "seed": "x"}, "seed must be an integer, got 'x'"),
        ({"sparsity": 0.5, "erk_power": "x"}, "erk_power must be a finite number, got 'x'"),
        (
            {"method": "set", "sparsity": 0.5, "total_steps": 60, "zeta": "x"},
            "option 'zeta' of method 'set' must be a finite number, got 'x'",
        ),
        (
            {"method": "rigl", "sparsity": 0.5, "total_steps": 60, "update_every": "abc"},
            "option 'update_every' of method 'rigl' must be an integer, got 'abc'",
        ),
        ({"method": "static", "sparsity": [0.5, 0.8]}, "'static' takes one sparsity.*list"),
        ({"method": "static", "sparsity": [0.5]}, "'static' takes one sparsity.*list"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_cnn, kwargs, message):
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.1)
    with pytest.raises(st.ConfigError, match=message):
        st.sparsify(tiny_cnn, opt, **kwargs)


def test_load_state_dict_refuses_other_method(tiny_cnn):
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.1)
    sp = st.sparsify(tiny_cnn, opt, method="static", sparsity=0.5)
    state = sp.state_dict()
    state["method"] = "rigl"
    with pytest.raises(st.CheckpointError, match="method 'rigl'"):
        sp.load_state_dict(state)
