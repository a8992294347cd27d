"""C-GaP (method ``gap``), its layout and the layer partitions it grows and prunes."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.distributions import global_magnitude
from sparsetrain.methods import build_method
from sparsetrain.methods.gap.method import gap_phases
from sparsetrain.methods.gap.partitions import (
    by_count,
    by_globs,
    layer_state_keys,
    make_partition,
    norm_owners,
)
from sparsetrain.models import build_model
from sparsetrain.train.config import load_config
from tests.conftest import TinyCNN

STEPS, STEPS_PER_EPOCH = 40, 5


def tiny_params() -> dict[str, nn.Parameter]:
    torch.manual_seed(0)
    return {n: p for n, p in TinyCNN().named_parameters() if p.dim() >= 2}


# ------------------------------------------------------------- partitions
def test_by_count_makes_contiguous_groups_of_whole_layers_by_parameter_count():
    # conv1 72, conv2 1152, fc1 8192, fc2 128 weights: half of 9544 lies nearest after conv2.
    assert by_count(tiny_params(), 2).groups == (
        ("conv1.weight", "conv2.weight"),
        ("fc1.weight", "fc2.weight"),
    )
    assert [len(g) for g in by_count(tiny_params(), 4).groups] == [1, 1, 1, 1]
    equal = {f"l{i}.weight": torch.zeros(10, 10) for i in range(6)}
    assert [len(g) for g in by_count(equal, 3).groups] == [2, 2, 2]


def test_by_count_keeps_a_layers_weights_together():
    params = {"a.w1": torch.zeros(50), "a.w2": torch.zeros(50), "b.w": torch.zeros(10)}
    groups = by_count(params, 2).groups
    assert groups == (("a.w1", "a.w2"), ("b.w",))


def test_by_count_rejects_more_groups_than_layers():
    with pytest.raises(st.ConfigError, match="4 sparse layers into 5 groups"):
        by_count(tiny_params(), 5)


def test_by_globs_matches_layer_and_parameter_names_and_leaves_the_rest_ungrouped():
    partition = by_globs(tiny_params(), [["conv*"], "fc1.weight"])
    assert partition.groups == (("conv1.weight", "conv2.weight"), ("fc1.weight",))
    assert partition.ungrouped == ("fc2.weight",)
    assert by_globs(tiny_params(), [["fc1"], ["conv1"]]).groups == (
        ("fc1.weight",),
        ("conv1.weight",),
    )


def test_by_globs_errors_name_the_glob_or_the_layer():
    with pytest.raises(st.ConfigError, match="'bogus\\*'"):
        by_globs(tiny_params(), [["conv*"], ["bogus*"]])
    with pytest.raises(st.ConfigError, match="'conv2' is in GaP partition groups 0 and 1"):
        by_globs(tiny_params(), [["conv*"], ["conv2.weight", "fc*"]])
    with pytest.raises(st.ConfigError, match="disagrees"):
        make_partition(tiny_params(), 3, [["conv*"], ["fc*"]])


def test_layer_state_keys_take_the_owning_modules_and_their_norms_params_and_buffers():
    model = TinyCNN()
    model.conv2.register_buffer("scale", torch.ones(1))
    keys = layer_state_keys(model, ["conv2.weight", "fc1.weight"])
    bn2 = ["bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"]
    assert keys == ["conv2.weight", "conv2.bias", "conv2.scale", "fc1.weight", "fc1.bias"] + [
        *bn2,
        "bn2.num_batches_tracked",
    ]
    assert not any(key.startswith("bn1.") for key in keys)


def conv_bn_pool() -> nn.Sequential:
    return nn.Sequential(
        nn.GroupNorm(1, 1),  # before any layer: in no group
        nn.Conv2d(1, 4, 3),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.LayerNorm(8),
        nn.BatchNorm1d(8),  # a second norm follows the same layer
        nn.Linear(8, 2),
    )


def test_each_norm_goes_with_the_nearest_layer_before_it():
    model = conv_bn_pool()
    assert norm_owners(model) == {"3": "1", "6": "5", "9": "8", "10": "8"}
    keys = layer_state_keys(model, ["1.weight", "11.weight"])
    assert [k for k in keys if k.startswith("3.")] == [
        "3.weight",
        "3.bias",
        "3.running_mean",
        "3.running_var",
        "3.num_batches_tracked",
    ]
    assert not any(k.startswith(("0.", "6.", "9.", "10.")) for k in keys)
    assert set(layer_state_keys(model, ["8.weight"])) >= {"9.weight", "10.running_var"}


def test_a_norm_after_a_dense_layer_stays_with_it_not_with_an_earlier_sparse_one():
    model = conv_bn_pool()
    # Only the convs are sparse: the Linear "8" is dense, so its norms travel with nothing.
    keys = layer_state_keys(model, ["1.weight", "5.weight"])
    assert not any(k.startswith(("9.", "10.")) for k in keys)


def test_resnet_blocks_keep_each_batchnorm_with_its_conv():
    model = build_model("resnet20")
    owners = norm_owners(model)
    assert owners["bn1"] == "conv1"
    assert owners["layer1.0.bn1"] == "layer1.0.conv1"
    assert owners["layer1.0.bn2"] == "layer1.0.conv2"
    assert owners["layer2.0.shortcut.1"] == "layer2.0.shortcut.0"
    assert set(owners) == {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    keys = layer_state_keys(model, ["layer1.0.conv1.weight"])
    assert keys[0] == "layer1.0.conv1.weight"
    assert {k.rpartition(".")[0] for k in keys} == {"layer1.0.conv1", "layer1.0.bn1"}


# ----------------------------------------------------------------- layout
def test_default_layout_is_two_rounds_in_80_percent_then_20_percent_finetune():
    rounds, phases = gap_phases(100, 4)
    assert rounds == 2
    assert [p.length for p in phases] == [10] * 8 + [20]
    assert phases[-1].kind == "finetune"


def test_step_length_fits_as_many_rounds_as_possible():
    rounds, phases = gap_phases(100, 2, step_length=3, unit="epochs", steps_per_epoch=5)
    assert rounds == 2  # 2 x 2 x 15 = 60 <= 80; 3 rounds would need 90
    assert phases.as_list()[-1] == ("finetune", 60, 100)
    rounds, phases = gap_phases(100, 2, rounds=1, step_length=0.5, unit="fraction")
    assert rounds == 1 and phases.as_list()[-1] == ("step", 50, 100)


def test_a_layout_without_finetune_ends_exactly_at_the_last_step():
    rounds, phases = gap_phases(97, 7, rounds=3, finetune=0, unit="steps")
    assert len(phases) == 21 and phases.total_steps == 97 and phases[-1].kind == "step"


def test_layouts_that_do_not_fit_are_errors():
    with pytest.raises(st.ConfigError, match="do not fit"):
        gap_phases(100, 4, rounds=3, step_length=10, unit="steps")
    with pytest.raises(st.ConfigError, match="not one GaP round"):
        gap_phases(100, 4, step_length=30, unit="steps")
    with pytest.raises(st.ConfigError, match="rounds to 0 steps"):
        gap_phases(10, 4, rounds=5)


# ------------------------------------------------------------------ C-GaP
def _train(seed=0, optimizer="sgd", watch=None, **options):
    """Run C-GaP for STEPS steps; ``watch(t, before, after)`` sees weights and masks around
    every step (``before``: right after the update, before the method's transition)."""
    torch.manual_seed(seed)
    model = TinyCNN()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snapshot = {}
    opt.register_step_post_hook(  # runs before the sparsifier's hook, which runs the method
        lambda o, a, k: snapshot.update(
            {n: p.detach().clone() for n, p in model.named_parameters()}
        )
    )
    if "partition" not in options:
        options.setdefault("groups", 2)
    sp = st.sparsify(
        model,
        opt,
        method="gap",
        sparsity=options.pop("sparsity", 0.8),
        total_steps=STEPS,
        steps_per_epoch=STEPS_PER_EPOCH,
        seed=seed,
        **options,
    )
    g = torch.Generator().manual_seed(seed)
    for t in range(1, STEPS + 1):
        before_masks = sp.masks
        x = torch.randn(8, 1, 16, 16, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if watch is not None:
            watch(t, sp, opt, before_masks, dict(snapshot))
    return sp, opt


def _state(sp):
    """Per group: 'dense' or 'ratio' (exactly at its target) or the active count."""
    out = []
    for names in sp.method.partition.groups + (sp.method.partition.ungrouped,):
        if names and all(bool(sp.mask(n).all()) for n in names):
            out.append("dense")
        elif all(
            int(sp.mask(n).sum()) == mask_ops.n_keep(sp.params[n].numel(), sp.targets[n])
            for n in names
        ):
            out.append("ratio")
        else:
            out.append("?")
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"groups": 2},
        {"groups": 3, "distribution": "global"},
        {"partition": [["conv*"], ["fc1"]]},
        {"groups": 2, "finetune": 0},
    ],
)
def test_exactly_one_group_is_dense_in_cyclic_order_then_all_sparse(options):
    seen = []

    def watch(t, sp, opt, before, weights):
        state = _state(sp)
        dense = sp.method.dense_group(t) if t < STEPS else None
        expected = ["dense" if i == dense else "ratio" for i in range(len(sp.method.partition))]
        assert state == [*expected, "ratio"], f"step {t}: {state}"
        seen.append(dense)

    sp, _ = _train(watch=watch, **options)
    kappa = len(sp.method.partition)
    order = [g for i, g in enumerate(seen) if i == 0 or g != seen[i - 1]]
    assert order == [*[i % kappa for i in range(2 * kappa)], None]  # 2 rounds, then fine-tune
    assert seen.count(None) == STEPS - sp.method.phases[2 * kappa - 1].end_step + 1
    zeros = sum(int((~m).sum()) for m in sp.masks.values())
    total = sum(p.numel() for p in sp.params.values())
    expected = sum(
        p.numel() - mask_ops.n_keep(p.numel(), sp.targets[n]) for n, p in sp.params.items()
    )
    assert zeros == expected and zeros / total == pytest.approx(0.8, abs=0.01)


def test_group_zero_is_dense_from_the_start_and_the_others_random_at_their_ratio():
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="gap", sparsity=0.9, total_steps=STEPS, groups=2)
    assert _state(sp) == ["dense", "ratio", "ratio"]
    assert sp.targets == {**dict.fromkeys(sp.params, 0.9), "conv1.weight": 0.0}


def test_the_stem_conv_stays_dense_in_no_group_unless_turned_off():
    seen = []
    sp, _ = _train(watch=lambda t, sp, *_: seen.append(bool(sp.mask("conv1.weight").all())))
    assert sp.method.stem == ["conv1.weight"] and all(seen)
    assert "conv1.weight" not in {n for names in sp.method.partition.groups for n in names}
    assert sp.sparsity == pytest.approx(
        0.8 * (1 - 72 / sum(p.numel() for p in sp.params.values())), abs=1e-3
    )
    sp, _ = _train(dense_stem=False)
    assert sp.method.stem == [] and sp.targets["conv1.weight"] == 0.8


def test_a_three_layer_mlp_gets_three_groups_by_default(caplog):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("INFO", logger="sparsetrain.methods.gap.method"):
        sp = st.sparsify(model, opt, method="gap", sparsity=0.5, total_steps=STEPS)
    assert len(sp.method.partition) == 3 and sp.method.stem == []  # no conv: no stem
    assert len(sp.method.phases) == 2 * 3 + 1
    assert "3 groups (the default 4, capped at the 3 sparse layers" in caplog.text


def test_prune_back_touches_only_the_grown_group_by_magnitude_and_grown_weights_start_at_0():
    transitions = []

    def watch(t, sp, opt, before, weights):
        after = sp.masks
        changed = {n for n in after if not torch.equal(after[n], before[n])}
        if not changed:
            return
        groups = sp.method.partition.groups
        pruned, grown = (
            sp.method.dense_group(t - 1),
            sp.method.dense_group(t) if t < STEPS else None,
        )
        assert changed <= set(groups[pruned]) | (set(groups[grown]) if grown is not None else set())
        for n in groups[pruned]:  # magnitude top-k of the weights right before the prune
            k = mask_ops.n_keep(sp.params[n].numel(), sp.targets[n])
            assert torch.equal(after[n], mask_ops.topk_mask(weights[n].abs(), k))
        if grown is not None:
            for n in groups[grown]:
                assert torch.all(sp.params[n][~before[n]] == 0)  # regrown positions start at 0
            assert len(opt.state) == 0  # fresh optimizer state, as the reference restarts it
        transitions.append((t, pruned, grown))

    _train(watch=watch, groups=2)
    assert transitions == [(8, 0, 1), (16, 1, 0), (24, 0, 1), (32, 1, None)]


def test_grown_weights_train_after_starting_at_0():
    masks_at = {}

    def watch(t, sp, opt, before, weights):
        masks_at[t] = (before, {n: p.detach().clone() for n, p in sp.params.items()})

    sp, _ = _train(watch=watch, groups=2)
    before_grow = masks_at[8][0]  # group 1 grows after step 8 and trains during steps 9-16
    weights = masks_at[12][1]
    regrown = ~before_grow["fc1.weight"]
    assert torch.count_nonzero(weights["fc1.weight"][regrown]) > 0


def test_continuous_optimizer_state_is_kept_and_masked_without_restart():
    def watch(t, sp, opt, before, weights):
        if t == 8:
            assert len(opt.state) > 0
            for n, p in sp.params.items():
                for value in opt.state[p].values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        assert torch.all(value[~sp.mask(n)] == 0)

    _train(watch=watch, groups=2, optimizer="adamw", restart_optimizer=False)


def test_global_ratios_come_from_the_trained_weights_of_round_one_and_are_then_kept():
    recorded, targets = {}, {}

    def watch(t, sp, opt, before, weights):
        if t in (8, 16):  # each group's first prune-back: its trained dense weights
            for n in sp.method.partition.groups[sp.method.dense_group(t - 1)]:
                recorded[n] = weights[n]
        targets[t] = dict(sp.targets)

    sp, _ = _train(watch=watch, groups=2, distribution="global")
    expected = global_magnitude(recorded, 0.8)
    assert sp.method.ratios == expected and len(set(expected.values())) > 1
    group0, group1 = sp.method.partition.groups
    assert all(targets[8][n] == 0.8 for n in group0)  # round 1 runs at the uniform ratio
    assert all(targets[16][n] == expected[n] for n in group1)  # fixed as round 1 ends
    assert all(targets[16][n] == 0.8 for n in group0)  # ... group 0 at its next prune-back
    assert all(targets[24][n] == expected[n] for n in group0)
    zeros = sum(int((~sp.mask(n)).sum()) for n in expected)
    assert zeros / sum(sp.params[n].numel() for n in expected) == pytest.approx(0.8, abs=0.01)


def test_the_lr_warm_up_restarts_at_every_phase_and_the_lr_is_restored():
    seen = []
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.register_step_post_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    st.sparsify(
        model, opt, method="gap", sparsity=0.8, total_steps=STEPS, groups=2, restart_warmup=0.5
    )
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 1, 16, 16)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    ramp = [0.05 * f for f in (0.25, 0.5, 0.75, 1, 1, 1, 1, 1)]  # phases of 8 steps, W = 4
    assert seen == pytest.approx(ramp * 5)
    assert opt.param_groups[0]["lr"] == 0.05


def test_bad_options_are_errors():
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(st.ConfigError, match="not both"):
        st.sparsify(
            model, opt, method="gap", sparsity=0.8, total_steps=40, groups=2, partition=["c*"]
        )
    with pytest.raises(st.ConfigError, match="shard applies to P-GaP"):
        st.sparsify(model, opt, method="gap", sparsity=0.8, total_steps=40, shard=True)
    with pytest.raises(st.ConfigError, match="needs total_steps"):
        st.sparsify(model, opt, method="gap", sparsity=0.8)
    with pytest.raises(st.ConfigError, match="pgap_train"):
        st.sparsify(model, opt, method="gap", sparsity=0.8, total_steps=40, parallel=True)


def test_resuming_with_another_schedule_is_refused():
    def build(groups):
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return st.sparsify(model, opt, method="gap", sparsity=0.8, total_steps=STEPS, groups=groups)

    build(2).load_state_dict(build(2).state_dict())
    with pytest.raises(st.CheckpointError, match="GaP schedule"):
        build(3).load_state_dict(build(2).state_dict())


@pytest.mark.parametrize(
    ("name", "layout"),
    [("gap", [133, 134, 133, 133, 134, 133, 200]), ("pgap", [200] * 4 + [200])],
)
def test_shipped_configs_build_their_documented_layout(name, layout):
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    s = config.sparsity
    common = dict(sparsity=s.sparsity, total_steps=config.train.epochs * 100, steps_per_epoch=100)
    if name == "gap":  # the group count is capped at the small CNN's layers after the stem
        model = build_model(config.model.name)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        method = st.sparsify(model, opt, method="gap", **common, **s.options).method
        assert len(method.partition) == 3 and method.stem == ["features.0.weight"]
    else:
        method = build_method("gap", {**common, "distribution": s.distribution}, s.options)
    assert [p.length for p in method.phases] == layout
    assert method.parallel == (name == "pgap")
