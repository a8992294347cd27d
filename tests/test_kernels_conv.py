"""Sparse convolution kernels: the masked dense convolution's mathematics, the compiled
extension built where a compiler exists, and the dense fallback where it cannot be."""

import copy
import logging
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN
from torch import nn

import sparsetrain as st
from sparsetrain.kernels import (
    DISABLE_ENV,
    Autotuner,
    ConvStructure,
    ConvTuneKey,
    KernelConv1d,
    KernelConv2d,
    StepKey,
    conv_kernels,
    use_kernels,
)
from sparsetrain.kernels import extension as extension_module
from sparsetrain.kernels.mode import GROUPS_REASON, NO_EXTENSION

ROOT = Path(__file__).resolve().parents[1]


def _compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _sparse(model, sparsity=0.7, kernels="sparse", **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return st.sparsify(model, opt, method="static", sparsity=sparsity, kernels=kernels, **options)


def _check_layer(conv, x, sparsity=0.7, tol=1e-4):
    """One training forward and backward through ``conv`` on the kernels against the plain
    masked layer: output, input gradient, kept weight gradient (zero elsewhere), bias."""
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    sp = _sparse(model, sparsity)
    assert type(model[0]) in (KernelConv1d, KernelConv2d)
    ref = copy.deepcopy(model)  # plain class: the masked dense layer
    assert type(ref[0]) in (nn.Conv1d, nn.Conv2d)
    mask = sp.mask("0.weight")
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = model(xs), ref(xr)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert sp.kernels.choices()["0.weight"] == "sparse"
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad * mask, rtol=tol, atol=tol)
    assert not model[0].weight.grad[~mask].any()
    if conv.bias is not None:
        torch.testing.assert_close(model[0].bias.grad, ref[0].bias.grad, rtol=tol, atol=tol)
    layout = torch.channels_last
    if y.dim() == 4:  # the layout F.conv2d keeps
        assert y.is_contiguous(memory_format=layout) == y_ref.is_contiguous(memory_format=layout)
        assert xs.grad.stride() == xr.grad.stride()
    return y


def test_the_extension_is_built_where_a_compiler_exists():
    """CI has a compiler: there the compiled path must be what runs, never skipped."""
    kernels = conv_kernels()
    if _compiler():
        assert kernels is not None, "a C++ compiler exists but the extension did not build"
        assert kernels.tiles == {torch.float32: 16, torch.float64: 8}
    else:
        assert kernels is None


CONV2D = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=3, kernel_size=(3, 2), stride=(2, 3), padding=(2, 1)),
    dict(in_channels=3, out_channels=4, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=3, out_channels=4, kernel_size=(2, 4), padding="same", dilation=(2, 1)),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"),
    dict(in_channels=5, out_channels=4, kernel_size=1, stride=2),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular"),
]


@pytest.mark.parametrize(
    "options", CONV2D, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
@pytest.mark.parametrize("batch", [5, 17])  # fewer and more images than one packed tile
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_equals_the_masked_dense_convolution(options, batch, channels_last):
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    x = torch.randn(batch, options["in_channels"], 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = _check_layer(nn.Conv2d(**options), x)
    if channels_last and options.get("padding_mode", "zeros") == "zeros":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "options",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, bias=False),
        dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", dilation=3),
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular"),
    ],
    ids=["pad1", "stride2", "same-dilated", "circular"],
)
def test_conv1d_equals_the_masked_dense_convolution(options):
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    _check_layer(nn.Conv1d(**options), torch.randn(7, options["in_channels"], 23))


def test_float64_matches_to_double_precision():
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    _check_layer(conv, torch.randn(9, 4, 8, 8, dtype=torch.float64), tol=1e-10)


@pytest.mark.parametrize("sparsity", [0.1, 0.99])
def test_nearly_full_and_nearly_empty_masks(sparsity):
    """99%: most output channels keep no weight at all (their output is the bias)."""
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    _check_layer(nn.Conv2d(6, 8, 3, padding=1), torch.randn(4, 6, 7, 7), sparsity=sparsity)


def test_structure_lists_every_kept_weight_in_both_orders():
    mask = torch.rand(5, 4, 3, 2) < 0.4
    s = ConvStructure.from_mask(mask)
    kept = mask.nonzero()
    assert s.nnz == len(kept) and s.shape == (5, 24) and s.kernel == (3, 2)
    assert torch.equal(torch.stack([s.out_channel, s.in_channel, s.ky, s.kx], 1), kept)
    assert torch.equal(s.rowptr.diff(), mask.sum((1, 2, 3)))
    assert torch.equal(s.rowptr_t.diff(), mask.sum((0, 2, 3)))
    assert torch.equal(s.in_channel[s.perm_t], s.in_channel.sort(stable=True).values)
    w = torch.randn(5, 4, 3, 2)
    assert torch.equal(s.gather(w), w[mask])


def test_cnn_trains_the_same_on_sparse_convolutions(batches):
    results = []
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = st.sparsify(
            model, opt, method="rigl", sparsity=0.8, total_steps=10, update_every=3, end=1.0
        )
        use_kernels(sp, kernels)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        results.append((model, sp))
    (a, dense_sp), (b, sp) = results
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-4, msg=name)
    for name, mask in dense_sp.masks.items():
        assert torch.equal(sp.masks[name], mask), name
    if conv_kernels() is not None:
        assert {"conv1.weight", "conv2.weight"} <= set(sp.kernels.layers)
        assert sp.kernels.choices()["conv2.weight"] == "sparse"
        assert sp.kernels.stats.rebuilds > 4  # RigL changed the masks: structures rebuilt


def test_mask_change_rebuilds_the_structure_and_results_still_match():
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    sp = _sparse(model)
    x = torch.randn(6, 3, 10, 10)
    model(x).sum().backward()
    assert sp.kernels.stats.rebuilds == 2
    new = torch.rand(4, 8, 3, 3) < 0.2
    sp.set_mask("2.weight", new)
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(4, 8, 3, 3) * new)
    model.zero_grad()
    y = model(x)
    assert sp.kernels.stats.rebuilds == 3  # only the changed layer
    assert sp.kernels.layers["2.weight"].structure.nnz == int(new.sum())
    y.sum().backward()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    y_ref = ref(x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[2].weight.grad, ref[2].weight.grad * new, rtol=1e-4, atol=1e-4)


def test_dense_gradients_context_gives_the_full_convolution_gradient():
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same", dilation=2))
    sp = _sparse(model, 0.8)
    x = torch.randn(4, 3, 9, 9)
    weight, mask = model[0].weight, sp.mask("0.weight")
    with sp.kernels.dense_gradients():
        (grad,) = torch.autograd.grad(model(x).square().sum(), weight)
    ref = copy.deepcopy(model)
    (grad_ref,) = torch.autograd.grad(ref(x).square().sum(), ref[0].weight)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)
    assert grad[~mask].abs().sum() > 0
    (grad,) = torch.autograd.grad(model(x).square().sum(), weight)
    assert not grad[~mask].any()


def test_modules_stay_plain_for_copies_state_dict_and_detach():
    torch.manual_seed(0)
    model = TinyCNN()
    keys = list(model.state_dict())
    params = list(model.parameters())
    sp = _sparse(model, 0.5)
    if conv_kernels() is not None:
        assert type(model.conv1) is KernelConv2d and isinstance(model.conv1, nn.Conv2d)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    model(torch.randn(2, 1, 16, 16))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), sp.export()):
        assert type(copied.conv1) is nn.Conv2d and not hasattr(copied.conv1, "_kernel")
        assert list(copied.state_dict()) == keys
    plain = TinyCNN()
    plain.load_state_dict(model.state_dict())  # a trained model loads into the plain model
    use_kernels(sp, "dense")
    assert type(model.conv1) is nn.Conv2d and sp.mask_listeners == []


def test_eval_mode_runs_the_plain_masked_convolution():
    torch.manual_seed(0)
    model = TinyCNN()
    sp = _sparse(model, 0.5)
    model.eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x))
    assert sp.kernels.stats.rebuilds == 0


def test_grouped_convolutions_stay_dense_with_a_log_line(caplog):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 4, 1))
    with caplog.at_level(logging.INFO, logger="sparsetrain.kernels.mode"):
        sp = _sparse(model, 0.5)
    assert sp.kernels.dense_reasons["0.weight"] == GROUPS_REASON
    assert type(model[0]) is nn.Conv2d
    assert "0.weight (grouped convolutions" in caplog.text
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x), rtol=1e-4, atol=1e-5)


def test_unbatched_input_runs_the_dense_layer():
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    sp = _sparse(model)
    x = torch.randn(3, 8, 8)  # (C, H, W), which nn.Conv2d accepts
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x))
    assert sp.kernels.choices()["0.weight"] == "dense"


def test_the_environment_variable_forces_the_dense_fallback(monkeypatch, batches):
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert conv_kernels() is None
    results = []
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = st.sparsify(model, opt, method="static", sparsity=0.8, kernels=kernels)
        for x, y in batches[:3]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        results.append((model, sp))
    (a, _), (b, sp) = results
    assert type(b.conv1) is nn.Conv2d
    assert sp.kernels.dense_reasons["conv1.weight"] == NO_EXTENSION
    assert sp.kernels.choices()["fc1.weight"] == "sparse"  # Linear layers are unaffected
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def fail(name, flags):
        raise RuntimeError(f"no compiler for {name}")

    monkeypatch.setattr(extension_module, "_build", fail)
    extension_module._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert conv_kernels() is None
            model = nn.Sequential(nn.Conv2d(3, 4, 3))
            sp = _sparse(model)
            assert conv_kernels() is None
        assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
        message = str(caught[0].message)
        assert "masked dense" in message and "no compiler for sparsetrain_conv_portable" in message
        assert sp.kernels.dense_reasons["0.weight"] == NO_EXTENSION
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x))
    finally:
        extension_module._load.cache_clear()  # the next call loads the real build again


BUILD_CHECK = """
import warnings, torch, torch.nn.functional as F
from sparsetrain.kernels import ConvGeometry, ConvStructure, conv_kernels, sparse_conv
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kernels = conv_kernels()
if kernels is None:
    print("fallback", len(caught), caught[0].message if caught else "")
else:
    mask = torch.rand(4, 3, 3, 3) < 0.5
    w, x = torch.randn(4, 3, 3, 3) * mask, torch.randn(2, 3, 6, 6)
    g = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1))
    y = sparse_conv(x, w, None, kernels, ConvStructure.from_mask(mask), g)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-5)
    print("built", kernels.path)
"""


def _fresh_process(tmp_path, timeout=300, **env):
    full = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}
    full.pop(DISABLE_ENV, None)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", BUILD_CHECK]
    done = subprocess.run(command, capture_output=True, text=True, env=full, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_fresh_process_compiles_the_extension_from_the_shipped_source(tmp_path):
    """The build from scratch (an empty extensions directory), as on a new machine."""
    out = _fresh_process(tmp_path)
    if _compiler():
        assert out[0] == "built" and out[1].startswith(str(tmp_path / "ext")), out
    else:
        assert out[:2] == ["fallback", "1"], out


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    """A killed build leaves torch's lock file behind, on which torch alone would wait forever."""
    if not _compiler():
        pytest.skip("no C++ compiler: nothing is built")
    build = tmp_path / "ext" / "sparsetrain_conv"
    build.mkdir(parents=True)
    (build / "lock").touch()
    out = _fresh_process(tmp_path, timeout=120)
    assert out[0] == "built" and not (build / "lock").exists(), out


def test_without_a_compiler_a_fresh_process_falls_back_with_one_warning(tmp_path):
    out = _fresh_process(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert out[:2] == ["fallback", "1"], out


def test_auto_times_each_convolution_once_and_keeps_the_faster():
    if conv_kernels() is None:
        pytest.skip("no C++ compiler: the fallback is tested below")
    speedups = {8: 3.0, 4: 0.5}  # by out_channels
    calls = []

    def timer(key, dense, sparse):
        dense()
        sparse()  # both candidates must run
        if isinstance(key, StepKey):
            return 1.0
        assert isinstance(key, ConvTuneKey)
        calls.append(key)
        return speedups[key.weight_shape[0]]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.9)
    mode = use_kernels(sp, "auto", tuner=Autotuner(timer, min_speedup=1.1))
    x = torch.randn(4, 3, 9, 9)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert mode.choices() == {"0.weight": "sparse", "2.weight": "dense"}
    assert len(calls) == 2  # cached after the first step
    assert not calls[0].grad_input and calls[1].grad_input  # the first layer's input needs none
    model(torch.randn(5, 3, 9, 9)).sum().backward()  # another batch size is another case
    assert len(calls) == 4


def test_a_compiled_conv_net_trains_like_the_eager_one_without_recompiling_per_layer():
    import torch._dynamo as dynamo

    results = []
    for compiled in (False, True):
        dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(
            *[m for _ in range(6) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sp = st.sparsify(model, opt, method="static", sparsity=0.8, kernels="sparse")
        run = torch.compile(model) if compiled else model
        g = torch.Generator().manual_seed(2)
        with dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            for _ in range(4):
                opt.zero_grad()
                run(torch.randn(3, 4, 8, 8, generator=g)).square().mean().backward()
                opt.step()
        if conv_kernels() is not None:
            assert set(sp.kernels.choices().values()) == {"sparse"}
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
