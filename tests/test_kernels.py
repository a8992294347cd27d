"""Sparse training kernels: same mathematics as the masked dense layer, structures kept in step."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_mlp
from torch import nn

import sparsetrain as st
from sparsetrain.errors import ConfigError
from sparsetrain.kernels import (
    Autotuner,
    GradBuffer,
    KernelLinear,
    LinearStructure,
    StepKey,
    conv_kernels,
    density_bucket,
    sparse_linear,
    use_kernels,
)


def _mask(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def _masked_dense(x, weight, bias, mask):
    """Reference: the masked dense layer's output and (x, weight, bias) gradients."""
    x, w = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = F.linear(x, w * mask, b)
    return y, x, w, b


@pytest.mark.parametrize("shape", [(7, 5), (16, 33), (1, 9)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_structure_is_the_csr_of_the_mask_and_of_its_transpose(shape, density):
    mask = _mask(shape, density)
    s = LinearStructure.from_mask(mask)
    ref, ref_t = mask.float().to_sparse_csr(), mask.t().float().to_sparse_csr()
    assert s.crow.dtype == s.col.dtype == torch.int32
    assert torch.equal(s.crow.long(), ref.crow_indices())
    assert torch.equal(s.col.long(), ref.col_indices())
    assert torch.equal(s.crow_t.long(), ref_t.crow_indices())
    assert torch.equal(s.col_t.long(), ref_t.col_indices())
    w = torch.randn(shape)
    values = s.gather(w)
    assert torch.equal(s.csr(values).to_dense(), w * mask)
    assert torch.equal(s.csr_t(values).to_dense(), (w * mask).t())
    assert s.nnz == int(mask.sum())


@pytest.mark.parametrize(
    "out_f, in_f, lead, density",
    [(6, 10, (4,), 0.3), (12, 7, (1,), 0.05), (9, 16, (2, 3), 0.5), (5, 5, (8,), 0.0)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_the_masked_dense_layer(out_f, in_f, lead, density, bias):
    torch.manual_seed(0)
    mask = _mask((out_f, in_f), density, seed=out_f)
    weight = torch.randn(out_f, in_f) * mask  # physical masking: zeros off the mask
    b = torch.randn(out_f) if bias else None
    x = torch.randn(*lead, in_f)
    grad_out = torch.randn(*lead, out_f)

    y_ref, x_ref, w_ref, b_ref = _masked_dense(x, weight, b, mask)
    y_ref.backward(grad_out)

    xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    y = sparse_linear(xs, ws, bs, LinearStructure.from_mask(mask))
    y.backward(grad_out)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # The masked dense layer's weight gradient after the sparsifier masks it.
    torch.testing.assert_close(ws.grad, w_ref.grad * mask, rtol=1e-5, atol=1e-5)
    assert not ws.grad[~mask].any()
    if bias:
        torch.testing.assert_close(bs.grad, b_ref.grad, rtol=1e-5, atol=1e-5)


def test_float64_matches_to_double_precision():
    mask = _mask((20, 30), 0.2)
    weight = torch.randn(20, 30, dtype=torch.float64) * mask
    x = torch.randn(11, 30, dtype=torch.float64)
    y_ref, _, w_ref, _ = _masked_dense(x, weight, None, mask)
    y_ref.sum().backward()
    ws = weight.clone().requires_grad_()
    y = sparse_linear(x, ws, None, LinearStructure.from_mask(mask))
    y.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ws.grad, w_ref.grad * mask, rtol=1e-12, atol=1e-12)


def test_weight_values_off_the_mask_are_never_read():
    mask = _mask((8, 12), 0.3)
    weight = torch.randn(8, 12)
    x = torch.randn(4, 12)
    y = sparse_linear(x, weight, None, LinearStructure.from_mask(mask))
    torch.testing.assert_close(y, F.linear(x, weight * mask), rtol=1e-5, atol=1e-6)


def test_dense_grad_is_the_raw_gradient_of_the_masked_layer():
    mask = _mask((10, 6), 0.3)
    x = torch.randn(5, 6)
    # What the optimizer pre-hook sees in dense mode: the gradient w.r.t. the physically masked
    # weight, before the sparsifier masks it.
    w_ref = (torch.randn(10, 6) * mask).requires_grad_()
    F.linear(x, w_ref).square().sum().backward()
    ws = w_ref.detach().clone().requires_grad_()
    s = LinearStructure.from_mask(mask)
    sparse_linear(x, ws, None, s, dense_grad=True).square().sum().backward()
    torch.testing.assert_close(ws.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    assert ws.grad[~mask].abs().sum() > 0  # really dense: RigL grows from these


def test_grad_buffer_is_reused_across_steps_and_never_overwrites_a_live_gradient():
    mask = _mask((9, 7), 0.4)
    s = LinearStructure.from_mask(mask)
    weight = (torch.randn(9, 7) * mask).requires_grad_()
    x = torch.randn(3, 7)
    w_ref = weight.detach().clone().requires_grad_()
    F.linear(x, w_ref).sum().backward()
    expected = w_ref.grad * mask
    step = [0]
    buffer = GradBuffer(lambda: step[0])

    def backward(*uses):
        sum(sparse_linear(u, weight, None, s, grad_buffer=buffer).sum() for u in uses).backward()

    backward(x)
    torch.testing.assert_close(weight.grad, expected)
    backward(x)  # accumulation within one step
    torch.testing.assert_close(weight.grad, 2 * expected)
    for _ in range(2):  # later steps: zero_grad(set_to_none=True), then the storage is reused
        step[0] += 1
        weight.grad = None
        backward(x)
        assert weight.grad.data_ptr() == buffer._storage.data_ptr()
        torch.testing.assert_close(weight.grad, expected)
    step[0] += 1
    weight.grad = None
    backward(x, 2 * x)  # the layer used twice in one graph: both gradients count
    torch.testing.assert_close(weight.grad, 3 * expected)

    step[0] += 1
    weight.grad = None  # a new structure: values written for the old mask must not survive
    other = LinearStructure.from_mask(~mask)
    sparse_linear(x, weight, None, other, grad_buffer=buffer).sum().backward()
    assert weight.grad.data_ptr() == buffer._storage.data_ptr()
    assert not weight.grad[mask].any()


def _train(model, kernels, method, steps=12, batches=None, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sp = st.sparsify(
        model,
        opt,
        method=method,
        sparsity=0.8,
        total_steps=steps,
        steps_per_epoch=4,
        kernels=kernels,
        **options,
    )
    for x, y in batches[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return sp


def _mlp_batches(n=12, features=256):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, features, generator=g), torch.randint(0, 4, (16,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "method, options",
    [
        ("static", {}),
        ("set", {"update_every": 3, "end": 1.0}),
        ("rigl", {"update_every": 3, "end": 1.0}),
    ],
)
def test_training_gives_the_same_weights_and_masks_as_dense(method, options):
    batches = _mlp_batches()
    runs = {}
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = tiny_mlp()
        runs[kernels] = (model, _train(model, kernels, method, batches=batches, **options))
    (dense_model, dense_sp), (sparse_model, sparse_sp) = runs["dense"], runs["sparse"]
    for (name, a), b in zip(dense_model.named_parameters(), sparse_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for name, mask in dense_sp.masks.items():
        assert torch.equal(sparse_sp.masks[name], mask), name
    kernels = sparse_sp.kernels
    assert set(kernels.layers) == {"1.weight", "3.weight", "5.weight"}
    assert "sparse" in kernels.choices().values()
    if method != "static":  # masks changed, so structures were rebuilt: more than one per layer
        assert kernels.stats.rebuilds > sum(c == "sparse" for c in kernels.choices().values())


def test_rigl_asks_for_dense_gradients_on_its_update_steps_only():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(
        model, opt, method="rigl", sparsity=0.8, total_steps=20, update_every=5, end=1.0
    )
    assert [t for t in range(1, 21) if sp.method.needs_dense_grad(t)] == [5, 10, 15]
    other = tiny_mlp()
    static = st.sparsify(
        other, torch.optim.SGD(other.parameters(), lr=0.1), method="static", sparsity=0.5
    )
    assert not any(static.method.needs_dense_grad(t) for t in range(1, 10))


def test_mask_change_rebuilds_only_then_and_results_still_match():
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = st.sparsify(model, opt, method="static", sparsity=0.7, kernels="sparse")
    x = torch.randn(5, 256)
    for _ in range(3):
        model(x).sum().backward()
    assert sp.kernels.stats.rebuilds == 3  # once per layer, on first use
    new = _mask((48, 256), 0.2, seed=7)
    sp.set_mask("1.weight", new)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(48, 256) * new)
    model.zero_grad()
    y = model(x)
    assert sp.kernels.stats.rebuilds == 4  # only the changed layer
    y.sum().backward()
    ref = copy.deepcopy(model)  # a plain copy: the masked dense model
    ref.zero_grad()
    y_ref = ref(x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].weight.grad, ref[1].weight.grad * new, rtol=1e-5, atol=1e-5)


def test_loading_sparsifier_state_rebuilds_structures():
    torch.manual_seed(0)
    model = tiny_mlp()
    sp = st.sparsify(
        model, torch.optim.SGD(model.parameters(), lr=0.0), sparsity=0.5, kernels="sparse"
    )
    model(torch.randn(2, 256))
    state = sp.state_dict()
    state["masks"]["3.weight"] = _mask((32, 48), 0.1, seed=3)
    sp.load_state_dict(state)
    model(torch.randn(2, 256))
    assert sp.kernels.stats.rebuilds == 6  # a loaded state replaces every mask
    assert sp.kernels.layers["3.weight"].structure.nnz == int(state["masks"]["3.weight"].sum())


def test_module_identity_state_dict_and_copies_are_unchanged():
    torch.manual_seed(0)
    model = tiny_mlp()
    plain_keys = list(model.state_dict())
    params = list(model.parameters())
    sp = st.sparsify(model, torch.optim.SGD(params, lr=0.1), sparsity=0.5, kernels="sparse")
    assert type(model[1]) is KernelLinear and isinstance(model[1], nn.Linear)
    assert list(model.state_dict()) == plain_keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    model(torch.randn(2, 256))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), sp.export()):
        assert type(copied[1]) is nn.Linear and not hasattr(copied[1], "_kernel")
        assert list(copied.state_dict()) == plain_keys
    use_kernels(sp, "dense")
    assert sp.kernels is None and type(model[1]) is nn.Linear
    assert sp.mask_listeners == []


def test_eval_mode_runs_the_plain_masked_layer():
    torch.manual_seed(0)
    model = tiny_mlp()
    sp = st.sparsify(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, kernels="sparse"
    )
    model.eval()
    x = torch.randn(3, 256)
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x))
    assert sp.kernels.stats.rebuilds == 0


def test_dense_gradients_context_gives_full_gradients():
    torch.manual_seed(0)
    model = tiny_mlp()
    sp = st.sparsify(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, kernels="sparse"
    )
    x = torch.randn(4, 256)
    weight, mask = model[1].weight, sp.mask("1.weight")
    # autograd.grad returns what the kernel computed (``.grad`` would be masked by the hook).
    with sp.kernels.dense_gradients():
        (grad,) = torch.autograd.grad(model(x).sum(), weight)
    assert grad[~mask].abs().sum() > 0
    (grad,) = torch.autograd.grad(model(x).sum(), weight)
    assert not grad[~mask].any()


def test_auto_keeps_dense_where_sparse_is_slower_and_times_each_case_once():
    speedups = {(48, 256): 3.0, (32, 48): 0.5, (4, 32): 1.05}  # by (out, in)
    calls = []

    def timer(key, dense, sparse):  # deterministic stand-in for wall-clock timing
        dense()
        sparse()  # both candidates must run
        if isinstance(
            key, StepKey
        ):  # the kept-weights optimizer step (tests/test_kernels_kept_step.py)
            return 1.0
        calls.append((key.out_features, key.in_features, key.batch))
        return speedups[key.out_features, key.in_features]

    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.9)
    mode = use_kernels(sp, "auto", tuner=Autotuner(timer, min_speedup=1.1))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 256)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    assert mode.choices() == {"1.weight": "sparse", "3.weight": "dense", "5.weight": "dense"}
    assert sorted(calls) == [(4, 32, 8), (32, 48, 8), (48, 256, 8)]  # cached after step 1
    model(torch.randn(5, 256)).sum().backward()  # another batch size is another case
    assert len(calls) == 6


def test_density_buckets_are_quarter_octaves():
    assert density_bucket(0.1) == density_bucket(0.105)
    assert density_bucket(0.1) != density_bucket(0.05)
    assert density_bucket(0.0) == 0.0


def test_unknown_kernels_is_a_config_error():
    model = tiny_mlp()
    with pytest.raises(ConfigError, match="unknown kernels 'fast'"):
        st.sparsify(
            model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, kernels="fast"
        )


def test_config_accepts_kernels_and_rejects_typos():
    from sparsetrain.train.config import config_from_dict

    assert config_from_dict({"sparsity": {"kernels": "auto"}}).sparsity.kernels == "auto"
    with pytest.raises(ConfigError, match="sparsity.kernels"):
        config_from_dict({"sparsity": {"kernels": "spares"}})


@pytest.mark.parametrize("name", st.list_methods())
def test_every_method_trains_identically_on_sparse_kernels(name):
    """Registry-driven: the same masks and weights with kernels="sparse" as with dense layers
    (TinyCNN: convolutions and Linear layers on sparse kernels), with the optimizer stepping
    kept weights only (except in kept-values mode, AST)."""
    from tests.method_cases import CASES, run_case

    runs = [run_case(name, kernels=kernels)[::2] for kernels in ("dense", "sparse")]
    (dense, dense_sp), (sparse, sparse_sp) = runs
    assert (sparse_sp.kernels.stats.rebuilds > 0) == (name != "dense")  # CSR really ran
    if name != "dense" and conv_kernels() is not None:  # and so did the sparse convolution
        assert "conv2.weight" in sparse_sp.kernels.layers
    kept_step = name != "dense" and not CASES[name].get("kept_values")
    assert (sparse_sp.kernels.kept_step.steps > 0) == kept_step
    for pname, mask in dense_sp.masks.items():
        assert torch.equal(sparse_sp.masks[pname], mask), pname
    for (pname, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=pname)


def test_training_reuses_gradient_storage_from_step_to_step():
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    st.sparsify(model, opt, method="static", sparsity=0.8, kernels="sparse")
    pointers = []
    for x, y in _mlp_batches(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pointers.append(model[1].weight.grad.data_ptr())
        opt.step()
    assert len(set(pointers)) == 1


def test_layers_the_kernels_cannot_run_fall_back_to_the_dense_layer():
    torch.manual_seed(0)
    model = tiny_mlp().to(torch.bfloat16)  # MKL's CSR kernels take float32/float64 only
    sp = st.sparsify(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, kernels="sparse"
    )
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(model(x), copy.deepcopy(model)(x))
    assert set(sp.kernels.choices().values()) == {"dense"}
    assert sp.kernels.stats.rebuilds == 0


def test_zero_grad_without_set_to_none_gives_the_gradient_once():
    """``.grad`` kept and zeroed in place must not be the storage the next gradient is written
    to (it would be added to itself)."""
    torch.manual_seed(0)
    models = [tiny_mlp(), None]
    models[1] = copy.deepcopy(models[0])
    grads = []
    for model, kernels in zip(models, ("dense", "sparse"), strict=True):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        st.sparsify(model, opt, method="static", sparsity=0.8, seed=0, kernels=kernels)
        for x, y in _mlp_batches(3):
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        grads.append(model[3].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_kernel_gradients_skip_masking_only_when_untouched():
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.8, kernels="sparse")
    x, y = _mlp_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert sp.kernels.masked_grads() == {"1.weight", "3.weight", "5.weight"}
    F.cross_entropy(model(x), y).backward()  # accumulated in place: masked as usual
    assert sp.kernels.masked_grads() == set()
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sp.set_mask("3.weight", ~sp.mask("3.weight"))  # mask replaced after the backward
    assert "3.weight" not in sp.kernels.masked_grads()
    sp.mask_gradients()
    assert not model[3].weight.grad[~sp.mask("3.weight")].any()


def test_a_weight_also_used_densely_is_still_masked():
    """A weight shared by a kernel layer and a dense product: autograd sums both gradients,
    and the sum (dense off the mask) is masked before the optimizer sees it."""
    torch.manual_seed(0)
    results = []
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = tiny_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = st.sparsify(model, opt, method="static", sparsity=0.8, seed=0, kernels=kernels)
        for x, y in _mlp_batches(3):
            opt.zero_grad()
            hidden = model[:4](x)
            out = model[4:](hidden) + F.linear(hidden, model[3].weight[:, :32].t())[:, :4]
            F.cross_entropy(out, y).backward()
            if kernels == "sparse":
                assert "3.weight" not in sp.kernels.masked_grads()
                assert "1.weight" in sp.kernels.masked_grads()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_grad_buffer_works_in_inference_mode():
    """The autotuner times the kernels under inference mode, where there is no version counter."""
    mask = _mask((9, 7), 0.4)
    s = LinearStructure.from_mask(mask)
    buffer = GradBuffer(iter(range(100)).__next__)
    with torch.inference_mode():
        for _ in range(2):
            grad = buffer.fill(torch.ones(s.nnz), s)
            assert torch.equal(grad, mask.float())
