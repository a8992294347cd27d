"""AST: nested sub-networks in one run, switchable BatchNorm, gradient correction, export, CLI."""

import contextlib
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain import cli, mask_ops
from sparsetrain.methods.ast.checkpoint import subnet_checkpoint
from sparsetrain.methods.ast.grad_correction import project_conflicting
from sparsetrain.methods.ast.nested_masks import is_nested
from sparsetrain.methods.ast.switchable_bn import SwitchableBatchNorm
from tests.conftest import TinyCNN

STEPS = 60
SPARSITIES = [0.5, 0.75, 0.9]
NM = [(2, 4), (1, 4), (1, 8)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one intra-op thread (two thrash on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 1, 16, 16, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :8].mean(dim=(1, 2)) > 0).long()
        out.append((x, y))
    return out


def _setup(model=None, sparsity=SPARSITIES, steps=STEPS, lr=0.05, momentum=0.9, **options):
    torch.manual_seed(0)
    model = model if model is not None else TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    options = {"update_every": 6, **options}
    sp = st.sparsify(model, opt, method="ast", sparsity=sparsity, total_steps=steps, **options)
    return model, opt, sp


def _step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _train(model, opt, steps, data=None, each=None) -> None:
    data = data or _data()
    for t in range(steps):
        _step(model, opt, *data[t % len(data)])
        if each is not None:
            each(t + 1)


def _nested(method) -> bool:
    return all(
        is_nested(method.subnet_masks(i), method.subnet_masks(i - 1))
        for i in range(1, method.num_subnets)
    )


# ----------------------------------------------------------------- unstructured masks
@pytest.mark.parametrize(
    ("distribution", "schedule"),
    [
        ("global", {}),
        ("uniform", {}),
        ("erk", {}),
        # Sub-network 1's last pruning update (44) comes before sub-network 0's (49).
        ("global", {"update_every": 12, "update_offset": 8}),
        ("uniform", {"update_every": 12, "update_offset": 8}),
    ],
)
def test_subnets_reach_exact_sparsity_and_stay_nested_at_every_step(distribution, schedule):
    model, opt, sp = _setup(distribution=distribution, **schedule)
    method = sp.method
    nested = []
    _train(model, opt, STEPS, each=lambda t: nested.append(_nested(method)))
    assert all(nested)
    assert method.ramp_done == [True] * 3
    for i, s in enumerate(SPARSITIES):
        masks = method.subnet_masks(i)
        if distribution == "global":
            total = sum(m.numel() for m in masks.values())
            kept = sum(int(m.sum()) for m in masks.values())
            assert kept == mask_ops.n_keep(total, s)
        else:
            targets = method.layer_targets(sp, s)
            for name, m in masks.items():
                assert int(m.sum()) == mask_ops.n_keep(m.numel(), targets[name]), name


def test_masks_still_change_after_the_ramp_with_the_same_counts():
    model, opt, sp = _setup()
    _train(model, opt, 48)  # every sub-network has done its last pruning update
    before = [sp.method.subnet_masks(i) for i in range(3)]
    _train(model, opt, 12)
    for i in range(3):
        after = sp.method.subnet_masks(i)
        assert any(not torch.equal(before[i][n], after[n]) for n in after)
        assert {n: int(m.sum()) for n, m in after.items()} == {
            n: int(m.sum()) for n, m in before[i].items()
        }


def test_updates_are_staggered_and_each_subnet_changes_only_on_its_own_updates():
    model, opt, sp = _setup(nested=False)
    method = sp.method
    changed = {i: [] for i in range(3)}
    last = [method.subnet_masks(i) for i in range(3)]

    def record(t):
        for i in range(3):
            now = method.subnet_masks(i)
            if any(not torch.equal(now[n], last[i][n]) for n in now):
                changed[i].append(t)
            last[i] = now

    _train(model, opt, STEPS, each=record)
    for i in range(3):
        assert changed[i], f"sub-network {i} never changed"
        assert all(method.is_update_step(i, t) for t in changed[i])
        assert all((t - 1) % 3 == i for t in changed[i])
    assert changed[0][0] < changed[1][0] < changed[2][0]


def test_overlap_is_reported_when_nesting_is_off():
    model, opt, sp = _setup(nested=False)
    violated = []
    _train(model, opt, STEPS, each=lambda t: violated.append(not _nested(sp.method)))
    overlap = sp.method.nesting_overlap()
    assert len(overlap) == 2 and all(0.0 < o <= 1.0 for o in overlap)
    assert any(violated)  # not forced: staggered, independent updates break nesting
    model, opt, sp = _setup()
    _train(model, opt, 30)
    assert sp.method.nesting_overlap() == [1.0, 1.0]


# -------------------------------------------------------------------------- N:M
def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    view = mask.movedim(1, -1) if mask.dim() > 2 else mask
    return view.reshape(-1, m).sum(dim=1)


def test_nm_subnets_have_exact_patterns_and_are_nested():
    model, opt, sp = _setup(sparsity=[0.5, 0.75, 0.875], nm=NM, nm_skip_incompatible=True)
    method = sp.method
    nested = []
    _train(model, opt, STEPS, each=lambda t: nested.append(_nested(method)))
    assert all(nested)
    assert method.ramp_done == [True] * 3
    for i, (n, m) in enumerate(NM):
        masks = method.subnet_masks(i)
        assert bool(masks["conv1.weight"].all())  # one input channel: kept dense
        for name in ("conv2.weight", "fc1.weight", "fc2.weight"):
            assert bool((_groups(masks[name], m) == n).all()), (i, name)
        assert sp.method.goals[i]["fc1.weight"] == pytest.approx(1 - n / m)


def test_nm_fraction_of_groups_ramps():
    model, opt, sp = _setup(sparsity=[0.5, 0.75, 0.875], nm=NM, nm_skip_incompatible=True)
    _train(model, opt, 19)  # sub-network 0 updated at 7, 13, 19: part of its groups are 2:4
    mask = sp.method.subnet_masks(0)["fc1.weight"]
    per_group = _groups(mask, 4)
    assert 0 < int((per_group == 2).sum()) < per_group.numel()
    assert bool(((per_group == 2) | (per_group == 4)).all())


def test_nm_layer_with_incompatible_input_size_is_an_error_naming_it():
    with pytest.raises(st.ConfigError, match=r"conv1\.weight.*input size 1"):
        _setup(sparsity=[0.5, 0.75, 0.875], nm=NM)


@pytest.mark.parametrize(
    ("sparsity", "options", "message"),
    [
        ([0.5, 0.75, 0.8], {"nm": NM}, "does not match nm"),
        ([0.5, 0.75], {"nm": [(2, 4), (1, 4), (1, 8)]}, "does not match nm"),
        ([0.5, 2 / 3], {"nm": [(2, 4), (2, 6)]}, "multiple of the previous"),
        ([0.75, 0.5], {}, "densest first"),
        ([0.5, 0.5], {}, "strictly"),
        (SPARSITIES, {"update_every": 40}, "never reach its sparsity"),
        (SPARSITIES, {"prune_window": [0.5]}, "prune_window"),
        (SPARSITIES, {"death_rate": 1.5}, "death_rate"),
    ],
)
def test_bad_options_are_errors(sparsity, options, message):
    with pytest.raises(st.ConfigError, match=message):
        _setup(sparsity=sparsity, **options)


def test_unnested_nm_needs_no_multiple():
    model = nn.Sequential(nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4))
    _setup(model=model, sparsity=[0.5, 2 / 3], nm=[(2, 4), (2, 6)], nested=False)


# ---------------------------------------------------------- alternation and kept values
def test_one_sgd_step_moves_every_shared_weight_though_only_the_active_ones_get_gradient():
    """As in the reference (masks in the forward only): momentum and weight decay move weights
    outside the active mask too, which the sub-networks using them keep."""
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = st.sparsify(
        model, opt, method="ast", sparsity=SPARSITIES, total_steps=STEPS, update_every=6
    )
    data = _data()
    _train(model, opt, 50, data)
    for t in range(51, 54):  # one step of each sub-network
        active = sp.method.active
        assert active == (t - 1) % 3
        mask = sp.method.subnet_masks(active)
        dense = {n: sp.dense_value(n).clone() for n in sp.params}
        momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in sp.params.items()}
        _step(model, opt, *data[t % len(data)])
        for name, p in sp.params.items():
            off = ~mask[name]
            assert bool((p.grad[off] == 0).all()), name
            buffer = opt.state[p]["momentum_buffer"]
            expected = 0.9 * momentum[name][off] + 5e-4 * dense[name][off]
            torch.testing.assert_close(buffer[off], expected)
            moved = dense[name][off] - 0.05 * expected
            torch.testing.assert_close(sp.dense_value(name)[off], moved)
            assert not off.any() or bool(buffer[off].abs().sum() > 0), name  # never zeroed
            assert torch.equal(p, sp.dense_value(name) * sp.mask(name)), name  # the next W * M


def test_defaults_follow_the_reference_scripts():
    _, _, sp = _setup(update_every=None)
    assert not sp.method.grad_correction  # run_cifar.sh never passes --pc_grad
    assert sp.method.update_every == 3  # 999 / 62,560 of 60 steps, at least K
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(
        model, opt, method="ast", sparsity=[0.5, 0.75, 0.875], nm=NM, total_steps=62560
    )
    assert sp.method.grad_correction  # run_nm_cifar.sh passes --pc_grad
    assert sp.method.update_every == 999  # the reference's own run length


def test_step_t_trains_subnet_t_minus_1_mod_k_with_its_own_batchnorm():
    model, opt, sp = _setup()
    bn = model.bn2
    assert isinstance(bn, SwitchableBatchNorm) and isinstance(model.bn1, nn.BatchNorm2d)
    _train(model, opt, 7)
    assert [int(c.num_batches_tracked) for c in bn.copies] == [3, 2, 2]
    assert sp.method.active == 7 % 3
    means = [c.running_mean for c in bn.copies]
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[1], means[2])


def test_new_batchnorm_parameters_join_the_group_of_the_originals():
    torch.manual_seed(0)
    model = TinyCNN()
    decay = [p for n, p in model.named_parameters() if not n.startswith("bn")]
    norms = [p for n, p in model.named_parameters() if n.startswith("bn")]
    opt = torch.optim.SGD(
        [{"params": decay}, {"params": norms, "weight_decay": 0.0, "lr": 0.01}],
        lr=0.1,
        weight_decay=5e-4,
    )
    st.sparsify(model, opt, method="ast", sparsity=SPARSITIES, total_steps=STEPS, update_every=6)
    copies = {id(p) for c in model.bn2.copies[1:] for p in c.parameters()}
    assert len(copies) == 4
    assert copies <= {id(p) for p in opt.param_groups[1]["params"]}
    assert not copies & {id(p) for p in opt.param_groups[0]["params"]}
    keys = model.state_dict()
    assert "bn2.copies.2.running_mean" in keys and "bn1.weight" in keys


def test_switchable_batchnorm_made_before_the_optimizer_is_adopted_and_trains_the_same():
    """``AST.prepare_model`` (what a sharded run does before ``fully_shard``) gives the run that
    switching inside ``st.sparsify`` gives: same masks, weights and every BatchNorm copy."""
    from sparsetrain.methods.ast import AST

    model, opt, sp = _setup()
    _train(model, opt, 12)
    torch.manual_seed(0)
    early = TinyCNN()
    AST.prepare_model(early, sparsity=SPARSITIES)
    assert isinstance(early.bn2, SwitchableBatchNorm) and isinstance(early.bn1, nn.BatchNorm2d)
    early_model, early_opt, early_sp = _setup(model=early)
    held = [id(p) for g in early_opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in early_model.parameters())  # each copy once
    _train(early_model, early_opt, 12)
    got, want = early_model.state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(early_sp.masks[n], m) for n, m in sp.masks.items())


def test_switchable_batchnorm_with_another_number_of_copies_is_refused():
    from sparsetrain.methods.ast import AST

    model = TinyCNN()
    AST.prepare_model(model, sparsity=[0.5, 0.9])
    with pytest.raises(st.ConfigError, match="3 sub-networks.*another number of copies"):
        _setup(model=model)


def test_batchnorm1d_unshared_first_and_models_without_batchnorm():
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(256, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)
    )
    model, opt, sp = _setup(model=mlp, share_first_bn=False)
    assert isinstance(model[2], SwitchableBatchNorm)
    _train(model, opt, 6)
    assert [int(c.num_batches_tracked) for c in model[2].copies] == [2, 2, 2]
    plain = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 4))
    model, opt, sp = _setup(model=plain)
    _train(model, opt, 30)
    assert sp.method.subnet_sparsity(2) > 0.5


# -------------------------------------------------------------- gradient correction
def _correction_run(grads, **options):
    """The gradients a Linear(4, 2) is updated with (SGD lr 1) when ``grads`` are its raw ones,
    checked against the weight change."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sp = st.sparsify(
        model,
        opt,
        method="ast",
        sparsity=[0.0, 0.25, 0.5],
        total_steps=100,
        prune_window=(0.5, 0.9),
        update_every=10,
        **{"grad_correction": True, **options},
    )
    used = []
    for g in grads:
        before = model.weight.detach().clone()
        opt.zero_grad()
        model.weight.grad = g.clone()
        opt.step()
        used.append(model.weight.grad.clone())
        torch.testing.assert_close(before - model.weight.detach(), used[-1])
    return used, sp


def _project(g, p):
    return g - (g * p).sum() / (p * p).sum() * p


def test_correction_fires_on_conflict_stores_uncorrected_and_skips_group_starts():
    g1 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    g2 = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # <g2, g1> = -1 < 0
    g3 = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # <g3, g2> = -2 < 0
    g4 = torch.tensor([[0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, -1.0]])  # conflicts with g3
    deltas, sp = _correction_run([g1, g2, g3, g4])
    assert torch.equal(deltas[0], g1)  # first step: nothing to correct against
    torch.testing.assert_close(deltas[1], _project(g2, g1))
    assert (deltas[1] * g1).sum().abs() < 1e-6  # orthogonal after the correction
    # Step 3 is corrected against g2 as computed, not against its corrected form.
    torch.testing.assert_close(deltas[2], _project(g3, g2))
    assert not torch.allclose(deltas[2], _project(g3, _project(g2, g1)))
    assert torch.equal(deltas[3], g4)  # step 4 starts a new inner group
    assert sp.method.conflicts == 2


def test_correction_leaves_agreeing_gradients_alone_and_can_be_turned_off():
    g1 = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    g2 = torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # <g2, g1> = 2 > 0
    deltas, sp = _correction_run([g1, g2])
    assert torch.equal(deltas[1], g2) and sp.method.conflicts == 0
    g2 = -g2
    deltas, sp = _correction_run([g1, g2], grad_correction=False)
    assert torch.equal(deltas[1], g2) and sp.method.conflicts == 0
    deltas, _ = _correction_run([g1, g2, g1], inner_group_size=2)
    assert torch.equal(deltas[2], g1)  # step 3 starts a group of 2


def test_projection_is_pcgrads_against_the_whole_previous_gradient():
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) > 0.4
    g = g * mask
    previous = -g + 0.5 * torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    expected = g - (g * previous).sum() / (previous * previous).sum() * previous
    fired = project_conflicting({"w": g}, {"w": previous})
    assert int(fired) == 1
    torch.testing.assert_close(g, expected)
    assert abs(float((g * previous).sum())) < 1e-5  # the conflict is removed
    assert bool((g[~mask] != 0).any())  # it reaches the previous sub-network's weights too


# -------------------------------------------------------------------- inference
def test_switching_changes_outputs_and_switching_back_restores_them_bit_for_bit():
    model, opt, sp = _setup()
    _train(model, opt, 45)
    x = _data(1, seed=5)[0][0]
    model.eval()
    outs = []
    for i in range(3):
        sp.use_subnet(i)
        outs.append(model(x))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    sp.use_subnet(0)
    assert torch.equal(model(x), outs[0])
    sp.use_subnet(0.9)
    assert sp.method.active == 2 and torch.equal(model(x), outs[2])
    assert sp.sparsity == pytest.approx(0.9, abs=1e-3)
    with pytest.raises(st.ConfigError, match="unknown sub-network"):
        sp.use_subnet(0.8)
    with pytest.raises(st.ConfigError, match="unknown sub-network"):
        sp.use_subnet(3)
    model.train()
    sp.use_subnet(1)  # step 46 belongs to sub-network 0
    with pytest.raises(st.SparsetrainError, match="resume_training"):
        _step(model, opt, *_data(1)[0])
    sp.method.resume_training(sp)
    _step(model, opt, *_data(1)[0])
    assert sp.step == 46


def test_one_checkpoint_reloads_every_subnet_and_resumes_exactly():
    model, opt, sp = _setup()
    data = _data()
    _train(model, opt, 26, data)  # mid-ramp, mid inner group: a stored gradient is pending
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "sp": sp.state_dict(), "opt": opt.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, fresh_opt, fresh_sp = _setup(model=TinyCNN())
    fresh_sp.load_state_dict(saved["sp"])
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    x = _data(1, seed=7)[0][0]
    model.eval()
    fresh.eval()
    for i in range(3):
        sp.use_subnet(i)
        fresh_sp.use_subnet(i)
        assert torch.equal(model(x), fresh(x))
    for m, s in ((model, sp), (fresh, fresh_sp)):
        m.train()
        s.method.resume_training(s)
        for t in range(26, 40):
            _step(m, opt if m is model else fresh_opt, *data[t % len(data)])
    assert torch.equal(
        torch.cat([p.flatten() for p in model.state_dict().values()]),
        torch.cat([p.flatten() for p in fresh.state_dict().values()]),
    )
    for i in range(3):
        a, b = sp.method.subnet_masks(i), fresh_sp.method.subnet_masks(i)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_checkpoint_of_other_subnets_is_refused():
    _, _, sp = _setup()
    _, _, other = _setup(sparsity=[0.5, 0.9])
    with pytest.raises(st.CheckpointError, match="sub-networks"):
        other.load_state_dict(sp.state_dict())


def test_export_of_each_subnet_loads_strict_and_reproduces_its_outputs():
    model, opt, sp = _setup()
    _train(model, opt, 50)
    x = _data(1, seed=9)[0][0]
    state = {"model": model.state_dict(), "sparsifier": sp.state_dict()}
    for i, s in enumerate(SPARSITIES):
        plain = sp.export(subnet=i)
        assert not any(isinstance(m, SwitchableBatchNorm) for m in plain.modules())
        fresh = TinyCNN()
        fresh.load_state_dict(plain.state_dict(), strict=True)
        fresh.eval()
        model.eval()
        sp.use_subnet(i)
        assert torch.equal(fresh(x), model(x))
        zeros = sum(int((fresh.state_dict()[n] == 0).sum()) for n in sp.params)
        total = sum(p.numel() for p in sp.params.values())
        assert zeros >= total - mask_ops.n_keep(total, s)
        # The same sub-network straight from the saved dicts (what the CLI uses).
        from_file = subnet_checkpoint(state, s)["model"]
        assert from_file.keys() == plain.state_dict().keys()
        assert all(torch.equal(from_file[k], v) for k, v in plain.state_dict().items())
    with pytest.raises(st.ConfigError, match="subnet="):
        sp.export(which="dense")


# ------------------------------------------------------------------------- CLI
TINY = [
    "--set",
    "data.name=synthetic",
    "data.options.num_samples=256",
    "model.name=small_cnn",
    "model.width=0.25",
    "sparsity.method=ast",
    "sparsity.sparsity=[0.5,0.8]",
    "sparsity.dense_first=true",
    "sparsity.options.update_every=4",
    "train.epochs=2",
    "train.batch_size=32",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ast") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["-q", "train", *TINY, "--out", str(out)])
    return code, stdout.getvalue(), out


def test_training_evaluates_every_subnet_and_eval_report_take_subnet(trained, capsys):
    code, stdout, out = trained
    assert code == 0
    accuracies = [float(a) / 100 for a in re.findall(r"subnet\d_test_acc: ([\d.]+)%", stdout)]
    assert len(accuracies) == 2
    assert re.search(r"subnet1_sparsity: 0\.8", stdout) and "nesting_overlap: [1.0]" in stdout
    assert cli.main(["eval", str(out / "final.pt")]) == 0
    printed = capsys.readouterr().out
    assert "sub-network 0:" in printed and "sub-network 1:" in printed
    listed = [float(a) / 100 for a in re.findall(r"test accuracy: ([\d.]+)%", printed)]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(listed, accuracies, strict=True))
    assert cli.main(["eval", str(out / "final.pt"), "--subnet", "0.8"]) == 0
    assert "sparsity: 80.00%" in capsys.readouterr().out
    assert (
        cli.main(["report", str(out / "final.pt"), "--subnet", "1", "-o", str(out / "l.png")]) == 0
    )
    assert "sparsity 80.00%" in capsys.readouterr().out
    assert cli.main(["report", str(out / "final.pt")]) == 2
    assert "--subnet" in capsys.readouterr().err
