"""The loops people write: clipping, accumulation, GradScaler, bf16 autocast, wrapped or forgotten
optimizers, keyword-called models, deferred init, torch.compile, two sparsifiers on one optimizer."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain.errors import ConfigError


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    ).to(dtype)


def batches(n: int, size: int = 32, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 16, generator=g, dtype=dtype), torch.randint(0, 4, (size,), generator=g))
        for _ in range(n)
    ]


def rigl(model: nn.Module, opt: torch.optim.Optimizer, **options) -> st.Sparsifier:
    kw = dict(method="rigl", sparsity=0.9, total_steps=40, update_every=4, distribution="uniform")
    return st.sparsify(model, opt, **{**kw, **options})


def masked_off_grads(sp: st.Sparsifier) -> list[float]:
    return [float(p.grad[~sp.mask(n)].abs().sum()) for n, p in sp.params.items()]


# ------------------------------------------------------------------------ item 1: clipping, accumulation
def test_gradients_are_masked_right_after_backward_so_clipping_sees_the_applied_norm():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.95)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert masked_off_grads(sp) == [0.0] * len(sp.params)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    applied = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(norm, applied)


def _rigl_update(clip: bool, premask: bool, micro: int = 1) -> tuple[dict, dict]:
    """Three plain steps, then RigL's update step (t=4) with clipping / a manual re-mask / the
    batch split into ``micro`` accumulated backward passes. Returns masks and the dense gradient."""
    model = mlp(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = rigl(model, opt)
    seen = {}
    before = sp.method.before_step

    def spy(sparsifier, t):
        if sparsifier.method.needs_dense_grad(t):
            seen.update({n: sparsifier.dense_grad(n).clone() for n in sparsifier.params})
        return before(sparsifier, t)

    sp.method.before_step = spy
    for t, (x, y) in enumerate(batches(4, dtype=torch.float64), start=1):
        opt.zero_grad()
        parts = micro if t == 4 else 1
        for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
            (F.cross_entropy(model(xs), ys) / parts).backward()
        if t == 4 and premask:
            sp.mask_gradients()
        if t == 4 and clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        opt.step()
    return sp.masks, seen


def test_rigl_grows_from_the_dense_gradient_whatever_the_loop_does_to_grad():
    plain_masks, plain_dense = _rigl_update(clip=False, premask=False)
    masks, dense = _rigl_update(clip=True, premask=True)
    assert plain_dense and all(bool((plain_dense[n] != 0).any()) for n in plain_dense)
    for name in plain_masks:
        assert torch.equal(masks[name], plain_masks[name])
        assert torch.equal(dense[name], plain_dense[name])


def test_rigl_grown_weights_are_the_top_dense_gradients():
    """The grown positions are the top |dense gradient| among the positions left after the drop,
    computed independently with autograd on the masked model (not the masked .grad, which put
    every grown weight in a handful of rows)."""
    model = mlp(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl(
        model, opt, update_every=1, alpha=0.2, drop_schedule="constant", dense_first_layer=False
    )
    x, y = batches(1, dtype=torch.float64)[0]
    before = sp.masks
    weights = [p for p in sp.params.values()]
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sp.mask_gradients()  # what users did to make clipping see masked gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    opt.step()
    for (name, new), grad in zip(sp.masks.items(), reference, strict=True):
        grown = new & ~before[name]
        n = int(grown.sum())
        assert n > 0
        candidates = ~(before[name] & new)  # inactive after the drop
        score = torch.where(candidates, grad.abs(), -1.0).reshape(-1)
        top = torch.zeros_like(score, dtype=torch.bool)
        top[torch.topk(score, n).indices] = True
        assert torch.equal(grown.reshape(-1), top)


@pytest.mark.parametrize("micro", [2, 4])
def test_accumulated_micro_batches_give_the_full_batch_dense_gradient(micro):
    masks, dense = _rigl_update(clip=False, premask=False)
    acc_masks, acc_dense = _rigl_update(clip=False, premask=False, micro=micro)
    for name in masks:
        torch.testing.assert_close(acc_dense[name], dense[name], rtol=1e-9, atol=1e-12)
        assert torch.equal(acc_masks[name], masks[name])


def test_a_backward_without_a_step_does_not_leak_into_the_next_dense_gradient():
    """zero_grad() after a skipped step (GradScaler found an inf) starts a fresh accumulation."""
    masks, dense = _rigl_update(clip=False, premask=False)
    model = mlp(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = rigl(model, opt)
    for t, (x, y) in enumerate(batches(4, dtype=torch.float64), start=1):
        if t == 4:  # an aborted attempt at step 4: backward, then no step
            opt.zero_grad(set_to_none=False)
            (100 * F.cross_entropy(model(x.flip(0)), y)).backward()
        opt.zero_grad(set_to_none=t % 2 == 0)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name in masks:
        assert torch.equal(sp.masks[name], masks[name])


def test_dense_gradient_outside_its_step_is_an_error():
    model = mlp()
    sp = rigl(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(st.SparsetrainError, match="dense gradient of step 1 was not kept"):
        sp.dense_grad("0.weight")


# ------------------------------------------------------------------------ item 3: floors, overrides
class Lopsided(nn.Module):
    """One big layer of large weights beside a small layer of tiny ones: a global top-k at 95%
    would empty the small one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(64, 256)
        self.small = nn.Linear(256, 10)
        with torch.no_grad():
            self.small.weight.mul_(1e-3)

    def forward(self, x):
        return self.small(torch.relu(self.big(x)))


@pytest.mark.parametrize("method", ["acdc", "gmp", "static"])
def test_global_distributions_keep_every_layer_above_its_floor(method, caplog):
    model = Lopsided()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw = dict(
        method=method, sparsity=0.95, total_steps=20, steps_per_epoch=10, distribution="global"
    )
    if method == "gmp":
        kw.update(start=0.0, end=0.5, frequency=1)
    with caplog.at_level(logging.WARNING):
        sp = st.sparsify(model, opt, **kw)
        x = torch.randn(8, 64)
        for _ in range(20):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    small = sp.mask("small.weight")
    assert int(small.sum()) == 26  # 1% of 2,560 weights, rounded half up
    total = sum(m.numel() for m in sp.masks.values())
    active = sum(int(m.sum()) for m in sp.masks.values())
    assert active == max(26 + 1, round(0.05 * total))  # the budget holds, floor included
    assert "small.weight held at the density floor" in caplog.text


def test_min_density_zero_lets_a_global_top_k_empty_a_layer():
    model = Lopsided()
    sp = st.sparsify(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        method="static",
        sparsity=0.95,
        distribution="global",
        min_density=0.0,
    )
    assert int(sp.mask("small.weight").sum()) == 0


def test_erk_floor_and_overrides_hold_exactly():
    from sparsetrain import distributions

    shapes = {"a": torch.Size([1000, 1000]), "b": torch.Size([10, 10]), "c": torch.Size([100, 100])}
    plain = distributions.erk(shapes, 0.999)
    floored = distributions.erk(shapes, 0.999, min_density=0.01)
    assert 1 - plain["a"] < 0.01 and floored["a"] == pytest.approx(0.99)
    assert all(1 - s >= 0.01 - 1e-12 for s in floored.values())
    weights = {n: torch.randn(s) for n, s in shapes.items()}
    targets = distributions.resolve("erk", weights, 0.9, overrides={"b": 0.5})
    assert targets["b"] == 0.5
    rest = {n: s for n, s in shapes.items() if n != "b"}
    assert {n: targets[n] for n in rest} == pytest.approx(distributions.erk(rest, 0.9))


# ------------------------------------------------------------------------ item 4: wrappers, drift
class Wrapper(torch.optim.Optimizer):
    """Like Accelerate's AcceleratedOptimizer: an Optimizer subclass that never ran its __init__."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_a_wrapped_optimizer_is_unwrapped_and_steps_the_sparsifier():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = Wrapper(inner)
    sp = st.sparsify(model, wrapped, method="static", sparsity=0.9)
    assert sp.optimizer is inner
    for x, y in batches(2):
        wrapped.zero_grad()
        F.cross_entropy(model(x), y).backward()
        wrapped.step()
    assert sp.step == 2
    with pytest.raises(ConfigError, match="wraps none"):
        st.sparsify(mlp(), object(), method="static", sparsity=0.5)


def test_the_wrong_optimizer_stepping_is_warned_and_shown_in_the_report(caplog):
    model = mlp()
    sparsified = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, sparsified, method="static", sparsity=0.9)
    other = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    with caplog.at_level(logging.WARNING):
        for x, y in batches(5):
            other.zero_grad()
            F.cross_entropy(model(x), y).backward()
            other.step()
            with torch.no_grad():  # what a dense optimizer's side effects look like
                model[0].weight.add_(1e-3)
    assert sp.step == 0
    assert "changed outside this sparsifier's optimizer step" in caplog.text
    report = sp.report()
    assert report.sparsity.sparsity == pytest.approx(0.9, abs=1e-3)  # the masks say 90%
    assert report.sparsity.weight_sparsity < 0.9  # the weights do not
    assert report.sparsity.unenforced and "masks are not being enforced" in report.format()


def test_the_report_shows_the_weights_zero_fraction_beside_the_masks():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.9)
    report = sp.report().sparsity
    assert report.weight_sparsity == pytest.approx(report.sparsity)
    assert not report.unenforced
    assert "weights 0" in report.format()


# ------------------------------------------------------------------------ item 5: keyword inputs
class KeywordLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids=None, attention_mask=None, return_dict=True):
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.head(torch.relu(self.proj(h)))


def test_keyword_called_models_get_flops():
    model = KeywordLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.75)
    ids = torch.randint(0, 50, (4, 6))
    model(input_ids=ids, attention_mask=torch.ones(4, 6), return_dict=True).sum().backward()
    opt.step()
    report = sp.report()
    assert sp.batch_size == 4
    assert report.flops is not None
    dense = 2 * 6 * (16 * 32 + 32 * 50)  # the two Linear layers, six tokens
    assert report.flops.per_module["proj"][0] + report.flops.per_module["head"][0] == dense
    assert report.flops.sparse < report.flops.dense


# ------------------------------------------------------------------------ item 6: meta device
def test_a_model_on_the_meta_device_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ConfigError, match="meta device: materialise the model first"):
        st.sparsify(
            model, torch.optim.SGD(model.parameters(), lr=0.1), method="static", sparsity=0.5
        )
    model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    sp = st.sparsify(
        model, torch.optim.SGD(model.parameters(), lr=0.1), method="static", sparsity=0.5
    )
    assert sp.sparsity == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------------ item 7: torch.compile
@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_a_compiled_model_trains_like_the_eager_one_without_recompiling_per_layer(kernels):
    import torch._dynamo as dynamo

    results = []
    for compiled in (False, True):
        dynamo.reset()
        model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.ReLU())])
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sp = rigl(model, opt, sparsity=0.8, total_steps=12, kernels=kernels)
        run = torch.compile(model) if compiled else model
        g = torch.Generator().manual_seed(2)
        with dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            for _ in range(8):
                x = torch.randn(8, 32, generator=g)
                opt.zero_grad()
                run(x).square().mean().backward()
                assert all(not p.grad[~sp.mask(n)].any() for n, p in sp.params.items())
                opt.step()
        results.append((sp.masks, [p.detach().clone() for p in model.parameters()]))
    (eager_masks, eager_w), (masks, weights) = results
    assert all(torch.equal(eager_masks[n], masks[n]) for n in masks)
    for a, b in zip(eager_w, weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ item 8: mixed precision
@pytest.mark.parametrize("method", ["static", "rigl", "acdc"])
def test_bf16_autocast_keeps_masks_enforced(method):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = st.sparsify(model, opt, method=method, sparsity=0.9, total_steps=40, steps_per_epoch=4)
    for x, y in batches(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert sp.step == 40
    for name, p in sp.params.items():
        assert not p[~sp.mask(name)].any()
        assert all(not s[~sp.mask(name)].any() for s in opt.state[p].values() if s.shape == p.shape)


def _scaled_run(method: str, poison: int | None) -> tuple[st.Sparsifier, nn.Module]:
    """Steps under GradScaler; at iteration ``poison`` the loss is inf, so scaler.step skips."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.sparsify(
        model,
        opt,
        method=method,
        sparsity=0.9,
        total_steps=40,
        steps_per_epoch=5,
        **({"update_every": 3} if method == "rigl" else {}),
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = batches(40)
    if poison is not None:
        data.insert(poison, data[poison])
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if i == poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
        scaler.step(opt)
        scaler.update()
    return sp, model


@pytest.mark.parametrize("method", ["rigl", "acdc"])
def test_a_step_grad_scaler_skips_does_not_advance_the_schedule(method):
    sp, model = _scaled_run(method, poison=None)
    skipped_sp, skipped = _scaled_run(method, poison=3)  # an update step of RigL (t=3)
    assert skipped_sp.step == sp.step == 40
    assert all(torch.equal(skipped_sp.masks[n], sp.masks[n]) for n in sp.masks)
    for a, b in zip(model.parameters(), skipped.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ item 9: two sparsifiers
def test_a_second_sparsifier_on_one_optimizer_is_refused_until_the_first_detaches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = st.sparsify(model, opt, method="static", sparsity=0.5)
    with pytest.raises(ConfigError, match="already guarded by another Sparsifier"):
        st.sparsify(model, opt, method="rigl", sparsity=0.9, total_steps=10)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="a weight is already guarded"):
        st.sparsify(model, other, method="static", sparsity=0.9)
    first.detach()
    second = st.sparsify(model, opt, method="static", sparsity=0.9)
    assert second.sparsity == pytest.approx(0.9, abs=1e-3)


def test_training_flops_count_every_accumulated_micro_batch():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="static", sparsity=0.9)
    for i, (x, y) in enumerate(batches(8, size=8), start=1):
        F.cross_entropy(model(x), y).backward()
        if i % 4 == 0:  # four micro-batches of 8 per step
            opt.step()
            opt.zero_grad()
    report = sp.report()
    assert sp.step == 2 and report.batch_size == 32
    state = sp.state_dict()
    assert state["backward_passes"] == 8
