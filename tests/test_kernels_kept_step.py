"""The optimizer step over kept weights only: the masked dense optimizer's weights and state."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN

import sparsetrain as st
from sparsetrain.kernels import Autotuner, ConvTuneKey, StepKey, TuneKey, use_kernels

OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3),
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=5e-4),
    "sgd_fused": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True
    ),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
    "adam_amsgrad_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3, amsgrad=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, fused=True),
}


def _step_only_tuner(step_speedup: float = 10.0) -> Autotuner:
    """Layers stay on the dense products (so gradients are bit-identical to the dense run) and
    the optimizer step takes the kept weights (or not, with a speed-up below 1)."""

    def timer(key, dense, sparse):
        dense()
        sparse()
        assert isinstance(key, StepKey | TuneKey | ConvTuneKey)
        return step_speedup if isinstance(key, StepKey) else 0.5

    return Autotuner(timer)


def _batches(n, channels_last=False):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        x = torch.randn(8, 1, 16, 16, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 4, (8,), generator=g)))
    return out


def _setup(optimizer, kept, channels_last=False, method="static", **options):
    torch.manual_seed(0)
    model = TinyCNN()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[optimizer](model.parameters())
    sp = st.sparsify(model, opt, method=method, sparsity=0.8, seed=0, **options)
    if kept:
        use_kernels(sp, "auto", tuner=_step_only_tuner())
    return model, opt, sp


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    """Bitwise equal (up to the sign of zero); fused kernels round a vector's elements
    differently from its tail's, so compact and dense tensors agree there to float rounding."""
    if exact:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def _assert_same_state(a: dict, b: dict, exact: bool = True) -> None:
    """Two optimizer state_dicts with the same keys, hyperparameters and tensors."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        other = b["state"][index]
        assert state.keys() == other.keys(), index
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == other[key].dtype and value.shape == other[key].shape
                assert _same(value, other[key], exact), (index, key)
            else:
                assert value == other[key], (index, key)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_kept_step_equals_the_masked_dense_optimizer_step_by_step(optimizer, channels_last):
    runs = [_setup(optimizer, kept, channels_last) for kept in (False, True)]
    (dense_model, dense_opt, dense_sp), (model, opt, sp) = runs
    exact, state_objects = "fused" not in optimizer, None
    for t, (x, y) in enumerate(_batches(6, channels_last)):
        if t == 3:  # a mask change: state is zeroed off the new mask in both runs
            new = {n: ~m for n, m in dense_sp.masks.items() if n.startswith("conv2")}
            new["fc1.weight"] = torch.roll(dense_sp.mask("fc1.weight"), 5, dims=1)
            dense_sp.set_masks(new)
            sp.set_masks(new)
        for m, o in ((dense_model, dense_opt), (model, opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for (name, a), b in zip(dense_model.named_parameters(), model.parameters(), strict=True):
            assert _same(a, b, exact), (t, name)
            assert _same(a.grad, b.grad, exact), (t, name)  # gradients handed back after the step
        _assert_same_state(dense_opt.state_dict(), opt.state_dict(), exact)
        if not exact:  # one step at a time: Adam amplifies a rounding difference in later steps
            dense_model.load_state_dict(model.state_dict())
            dense_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else shared tensors
        tensors = {
            (id(p), k): v for p, s in opt.state.items() for k, v in s.items() if v is not None
        }
        if state_objects is not None:  # updated in place: the same tensors in optimizer.state
            assert all(tensors[k] is v for k, v in state_objects.items())
        state_objects = tensors
    # Every sparse weight (2 convs, 2 Linear) on every step, but the first where the optimizer
    # creates state (the mask change's tensors are checked by a dense pass, then kept too).
    assert sp.kernels.kept_step.steps == 4 * (6 if optimizer == "sgd_plain" else 5)


@pytest.mark.parametrize(
    "method, options",
    [
        ("gmp", {"frequency": 3, "total_steps": 12, "steps_per_epoch": 4}),
        ("set", {"update_every": 3, "total_steps": 12, "end": 1.0}),
        ("rigl", {"update_every": 3, "total_steps": 12, "end": 1.0}),
    ],
)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_nesterov"])
def test_methods_that_change_masks_train_bitwise_like_the_dense_optimizer(
    method, options, optimizer
):
    """Mask updates zero optimizer state where a mask changes; the kept step sees those writes
    and the runs stay identical (RigL also reads dense gradients on its update steps)."""
    runs = [_setup(optimizer, kept, method=method, **options) for kept in (False, True)]
    for x, y in _batches(12):
        for model, opt, _ in runs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    (dense_model, dense_opt, dense_sp), (model, opt, sp) = runs
    assert sp.kernels.kept_step.steps > 0
    for name, mask in dense_sp.masks.items():
        assert torch.equal(sp.masks[name], mask), name
    for a, b in zip(dense_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    _assert_same_state(dense_opt.state_dict(), opt.state_dict())


def test_resume_from_a_kept_step_checkpoint_matches_dense():
    dense_model, dense_opt, _ = _setup("sgd_momentum_wd", kept=False)
    model, opt, sp = _setup("sgd_momentum_wd", kept=True)
    batches = _batches(6)
    for m, o in ((dense_model, dense_opt), (model, opt)):
        for x, y in batches[:3]:
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    # Resume the kept-step run in a fresh model and optimizer from its checkpoint.
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    resumed, resumed_opt, resumed_sp = _setup("sgd_momentum_wd", kept=True)
    resumed.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    resumed_sp.load_state_dict(saved[2])
    for m, o in ((dense_model, dense_opt), (resumed, resumed_opt)):
        for x, y in batches[3:]:
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(dense_model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    _assert_same_state(dense_opt.state_dict(), resumed_opt.state_dict())
    assert resumed_sp.kernels.kept_step.steps > 0


def test_state_that_is_not_zero_off_the_mask_takes_the_dense_optimizer():
    """The premise is checked: momentum off the mask (written by hand) must keep decaying as the
    dense optimizer decays it."""
    runs = [_setup("sgd_momentum_wd", kept) for kept in (False, True)]
    batches = _batches(4)
    for i, (x, y) in enumerate(batches):
        for model, opt, _ in runs:
            if i == 2:
                weight = model.fc1.weight
                opt.state[weight]["momentum_buffer"].add_(1.0)  # also off the mask
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    (dense_model, dense_opt, _), (model, opt, sp) = runs
    for a, b in zip(dense_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    _assert_same_state(dense_opt.state_dict(), opt.state_dict())


def test_weights_written_off_the_mask_are_still_masked_after_the_step():
    model, opt, sp = _setup("sgd_momentum_wd", kept=True)
    for i, (x, y) in enumerate(_batches(3)):
        if i == 2:
            with torch.no_grad():
                model.fc1.weight.fill_(1.0)  # by hand, between steps
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert not model.fc1.weight[~sp.mask("fc1.weight")].any()


def test_auto_keeps_the_dense_optimizer_where_the_kept_step_is_slower():
    runs = [_setup("adamw", kept=False), _setup("adamw", kept=False)]
    use_kernels(runs[1][2], "auto", tuner=_step_only_tuner(step_speedup=0.5))
    for x, y in _batches(3):
        for model, opt, _ in runs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert runs[1][2].kernels.kept_step.steps == 0
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_closure_step_takes_the_dense_optimizer():
    model, opt, sp = _setup("sgd_momentum_wd", kept=True)
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert sp.kernels.kept_step.steps == 0


def test_sparse_kernels_take_the_kept_step_and_train_like_dense():
    """``kernels="sparse"``: sparse products (CSR, convolutions) and the kept-weights step
    together."""
    results = []
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sp = st.sparsify(model, opt, method="static", sparsity=0.8, seed=0, kernels=kernels)
        for x, y in _batches(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        results.append((model, opt, sp))
    (dense, dense_opt, _), (sparse, opt, sp) = results
    assert sp.kernels.kept_step.steps == 4 * 4
    # A convolution bias followed by BatchNorm has a true gradient of zero: what it gets is
    # float32 rounding noise, amplified by BatchNorm on a near-constant channel (a channel that
    # kept one weight or none), which differs between the sparse and dense summation orders
    # (and with the thread count: up to 7e-6 apart on one thread with dense convolutions).
    # In float64 the two runs agree to 1e-16.
    noise = {"conv1.bias": 1e-3, "conv2.bias": 1e-3}
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=noise.get(name, 1e-6), msg=name)
        torch.testing.assert_close(
            opt.state[b]["momentum_buffer"],
            dense_opt.state[a]["momentum_buffer"],
            rtol=1e-4,
            atol=noise.get(name, 1e-5),
            msg=name,
        )
