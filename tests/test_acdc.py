"""AC/DC: phase layout, the compress/decompress transitions, N:M masks and the sparse-dense pair."""

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.errors import CheckpointError, ConfigError, ExportError
from sparsetrain.phases import Phase, Phases, acdc_phases
from tests.conftest import TinyCNN

STEPS, PER_EPOCH = 60, 10  # imagenet preset scaled to 60 steps (see EXPECTED_60)
EXPECTED_60 = [
    ("warmup", 0, 6),
    *[
        phase
        for start in range(6, 42, 6)
        for phase in (("compressed", start, start + 3), ("decompressed", start + 3, start + 6))
    ],
    ("compressed", 42, 45),
    ("last_dense", 45, 51),
    ("final_compressed", 51, 60),
]


def _layout(prune: list[int], restore: list[int], epochs: int, per_epoch: int) -> list[tuple]:
    """Phases from the reference code's prune/restore epochs (both given at phase starts)."""
    starts = sorted([0, *prune, *restore])
    kinds = ["warmup"] + ["compressed" if s in prune else "decompressed" for s in starts[1:]]
    kinds[-2:] = ["last_dense", "final_compressed"]
    ends = [*starts[1:], epochs]
    return [(k, s * per_epoch, e * per_epoch) for k, s, e in zip(kinds, starts, ends, strict=True)]


# ------------------------------------------------------------------ layout
def test_imagenet_preset_at_100_epochs_is_the_reference_schedule():
    # ImageNet configs: prune at 10, 20, ..., 70 and 85; restore at 15, ..., 65 and 75.
    expected = _layout([*range(10, 71, 10), 85], [*range(15, 66, 10), 75], 100, 7)
    assert acdc_phases(700, steps_per_epoch=7).as_list() == expected
    assert expected[-2:] == [("last_dense", 525, 595), ("final_compressed", 595, 700)]


def test_cifar_preset_at_200_epochs_is_the_reference_schedule():
    # CIFAR-100 WRN configs: prune at 10, 50, 90, 130, 170; restore at 30, 70, 110, 150.
    expected = _layout([10, 50, 90, 130, 170], [30, 70, 110, 150], 200, 3)
    assert acdc_phases(600, preset="cifar").as_list() == expected


def test_presets_scale_to_the_run_length():
    assert acdc_phases(STEPS).as_list() == EXPECTED_60
    twenty = acdc_phases(20 * 5, steps_per_epoch=5).as_list()  # 2 / 1 / 1 / 2 / 3 epochs
    assert twenty[0] == ("warmup", 0, 10) and twenty[1] == ("compressed", 10, 15)
    assert twenty[-2:] == [("last_dense", 75, 85), ("final_compressed", 85, 100)]


def test_lengths_in_epochs_steps_and_fractions_agree():
    lengths = dict(warmup=2, compressed=1, decompressed=1, last_dense=2, final_compressed=3)
    by_epochs = acdc_phases(200, preset=None, unit="epochs", steps_per_epoch=10, **lengths)
    by_steps = acdc_phases(
        200, preset=None, unit="steps", **{k: 10 * v for k, v in lengths.items()}
    )
    by_fraction = acdc_phases(
        200, preset=None, unit="fraction", **{k: v / 20 for k, v in lengths.items()}
    )
    assert by_epochs == by_steps == by_fraction
    assert by_epochs.as_list()[-2:] == [("last_dense", 150, 170), ("final_compressed", 170, 200)]


def test_given_lengths_override_the_preset_and_slack_lengthens_the_last_dense_phase():
    # 92 epochs of 10/5/5/10/15: the alternation 10-65 holds 6 compressed phases, 2 epochs spare.
    lengths = dict(warmup=10, compressed=5, decompressed=5, last_dense=10, final_compressed=15)
    phases = acdc_phases(92, steps_per_epoch=1, **lengths)
    assert phases.as_list()[-3:] == [
        ("compressed", 60, 65),
        ("last_dense", 65, 77),
        ("final_compressed", 77, 92),
    ]
    # one override on top of the scaled preset (final 15% of 100 steps -> 30 steps given)
    assert acdc_phases(100, final_compressed=30, unit="steps")[-1] == Phase(
        "final_compressed", 70, 100
    )


def test_one_step_phases_give_the_iht_like_variant():
    phases = acdc_phases(
        12,
        preset=None,
        unit="steps",
        warmup=0,
        compressed=1,
        decompressed=1,
        last_dense=1,
        final_compressed=2,
    )
    kinds = [p.kind for p in phases]
    assert kinds[:4] == ["compressed", "decompressed", "compressed", "decompressed"]
    assert all(p.length == 1 for p in phases.phases[:-1])


@pytest.mark.parametrize("total", [1, 2, 3, 4, 8, 15])
def test_short_runs_of_the_preset_get_phases_of_at_least_one_step(total, caplog):
    phases = acdc_phases(total)
    assert phases.total_steps == total and all(p.length >= 1 for p in phases)
    assert phases[-1].kind == "final_compressed"
    kinds = [p.kind for p in phases]
    assert ("compressed" in kinds) == (total >= 4)
    assert "too short" in caplog.text


def test_a_long_enough_run_keeps_the_scaled_preset(caplog):
    assert acdc_phases(STEPS).as_list() == EXPECTED_60
    assert "too short" not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_steps=100, preset="resnet"), "unknown AC/DC preset"),
        (dict(total_steps=100, preset=None, warmup=1), "missing"),
        (dict(total_steps=100, compressed=2), "needs steps_per_epoch"),
        (dict(total_steps=100, unit="minutes", compressed=2), "unknown length unit"),
        (dict(total_steps=100, compressed=0, unit="steps"), "longer than 0"),
        (dict(total_steps=10, final_compressed=9, unit="steps"), "do not fit"),
        (dict(total_steps=15, compressed=0.3, unit="steps"), "rounds to 0 steps"),
        (dict(total_steps=100, decompresed=5), "unknown AC/DC phase length"),
    ],
)
def test_bad_layouts_are_config_errors(kwargs, match):
    total = kwargs.pop("total_steps")
    with pytest.raises(ConfigError, match=match):
        acdc_phases(total, **kwargs)


def test_phases_lookup_and_validation():
    phases = Phases.from_lengths([("a", 2.5), ("skipped", 0), ("b", 2.5), ("c", 1)])
    assert phases.as_list() == [("a", 0, 3), ("b", 3, 5), ("c", 5, 6)]  # boundaries 2.5->3, 5, 6
    assert [phases.at(i).kind for i in range(7)] == ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    assert phases.starting_at(3) == Phase("b", 3, 5)
    assert phases.starting_at(4) is None and phases.starting_at(6) is None
    with pytest.raises(ConfigError, match="starts at step 2, expected 1"):
        Phases((Phase("a", 0, 1), Phase("b", 2, 3)))
    with pytest.raises(ConfigError, match="span 6 steps, training has 7"):
        Phases.from_lengths([("a", 6)], total_steps=7)


# ------------------------------------------------------------- transitions
class Recorder:
    """Runs the AC/DC state machine with grads set to None before every transition.

    A step post-hook registered before ``sparsify`` runs before the sparsifier's own (which
    switches phases): it records weights and optimizer state just before each transition and
    sets every grad to None, the PyTorch >= 2 ``zero_grad()`` default that made the reference's
    momentum reset a silent no-op. A hook registered after ``sparsify`` sees the state right after.
    """

    def __init__(self, optimizer_name="sgd", sparsity=0.9, seed=0, **options):
        torch.manual_seed(seed)
        self.model = TinyCNN()
        if optimizer_name == "sgd":
            self.opt = torch.optim.SGD(
                self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4
            )
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.opt.register_step_post_hook(self._before_transition)
        self.sp = st.sparsify(
            self.model,
            self.opt,
            method="acdc",
            sparsity=sparsity,
            total_steps=STEPS,
            steps_per_epoch=PER_EPOCH,
            seed=seed,
            **options,
        )
        self.opt.register_step_post_hook(self._after_transition)
        self.method = self.sp.method

    def _snapshot(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.model.named_parameters()},
            "state": {
                n: {k: v.clone() for k, v in self.opt.state[p].items()}
                for n, p in self.model.named_parameters()
            },
            "masks": self.sp.masks,
        }

    def _before_transition(self, opt, args, kwargs):
        self.before.append(self._snapshot())
        opt.zero_grad(set_to_none=True)

    def _after_transition(self, opt, args, kwargs):
        assert all(p.grad is None for p in self.model.parameters())
        self.after.append(self._snapshot())

    def run(self, steps=STEPS):
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(16, 1, 16, 16, generator=g)
            y = torch.randint(0, 4, (16,), generator=g)
            self.opt.zero_grad()
            F.cross_entropy(self.model(x), y).backward()
            self.opt.step()
        return self


def st_sparse_kinds():
    return ("compressed", "final_compressed")


def _kept(masks):
    return sum(int(m.sum()) for m in masks.values())


@pytest.fixture(scope="module")
def sgd_run():
    return Recorder().run()


def test_the_method_exposes_its_phases(sgd_run):
    assert sgd_run.method.phases.as_list() == EXPECTED_60
    assert sgd_run.method.final_phase == Phase("final_compressed", 51, 60)
    assert "last_dense" in sgd_run.method.describe()


def test_sparsity_is_exact_in_compressed_phases_and_zero_in_decompressed(sgd_run):
    rec, phases = sgd_run, sgd_run.method.phases
    total = sum(p.numel() for p in rec.sp.params.values())
    keep = mask_ops.n_keep(total, 0.9)
    for t, snap in enumerate(rec.after, start=1):  # after step t, the phase of step index t
        kind = phases.at(t).kind
        if kind in ("compressed", "final_compressed"):
            assert _kept(snap["masks"]) == keep, f"step {t}"
            for name, mask in snap["masks"].items():
                assert torch.all(snap["params"][name][~mask] == 0)
        else:
            assert _kept(snap["masks"]) == total, f"step {t}"
    # compressed phases prune the first and last layers too (global top-k)
    assert set(rec.sp.params) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert rec.sp.sparsity == pytest.approx(1 - keep / total)
    assert sum(rec.sp.targets[n] * p.numel() for n, p in rec.sp.params.items()) == pytest.approx(
        total - keep
    )


def test_each_compression_is_a_fresh_magnitude_top_k(sgd_run):
    rec = sgd_run
    total = sum(p.numel() for p in rec.sp.params.values())
    starts = [p.start_step for p in rec.method.phases if p.kind in st_sparse_kinds()]
    masks_per_phase = []
    for t in starts:
        weights = {n: rec.before[t - 1]["params"][n] for n in rec.sp.params}
        expected = mask_ops.global_topk(
            {n: w.abs() for n, w in weights.items()}, mask_ops.n_keep(total, 0.9)
        )
        for name, mask in rec.after[t - 1]["masks"].items():
            assert torch.equal(mask, expected[name]), f"step {t} {name}"
        masks_per_phase.append(rec.after[t - 1]["masks"])
    assert any(  # the support moves between compressed phases
        not torch.equal(a["fc1.weight"], b["fc1.weight"])
        for a, b in zip(masks_per_phase, masks_per_phase[1:], strict=False)
    )


def test_decompression_restores_at_zero_and_zeroes_all_momentum(sgd_run):
    rec = sgd_run
    starts = [p.start_step for p in rec.method.phases if p.kind in ("decompressed", "last_dense")]
    assert starts == [9, 15, 21, 27, 33, 39, 45]
    for t in starts:
        before, after = rec.before[t - 1], rec.after[t - 1]
        for name, mask in before["masks"].items():
            assert not torch.all(mask)
            assert torch.all(after["params"][name][~mask] == 0), f"{name} not restored at 0"
            assert torch.all(after["masks"][name])
        for name, state in after["state"].items():  # biases and BN too: reset_state="all"
            assert torch.all(state["momentum_buffer"] == 0), f"step {t}: {name} momentum"
        assert any(torch.any(s["momentum_buffer"] != 0) for s in before["state"].values())
    # the step after a decompression really trains the restored weights
    t = starts[0]
    grown = ~rec.before[t - 1]["masks"]["fc1.weight"]
    assert torch.any(rec.after[t]["params"]["fc1.weight"][grown] != 0)


def test_compression_masks_momentum_but_does_not_reset_it(sgd_run):
    rec = sgd_run
    for t in (6, 12, 51):
        before, after = rec.before[t - 1], rec.after[t - 1]
        for name in rec.model.state_dict():
            if name not in before["state"]:
                continue
            old, new = (
                before["state"][name]["momentum_buffer"],
                after["state"][name]["momentum_buffer"],
            )
            mask = after["masks"].get(name)
            if mask is None:
                assert torch.equal(new, old), f"dense {name} momentum changed"
            else:
                assert torch.equal(new[mask], old[mask]), f"kept {name} momentum changed"
                assert torch.all(new[~mask] == 0)
        assert any(torch.any(s["momentum_buffer"] != 0) for s in after["state"].values())


def test_adam_moments_and_step_restart_at_decompression():
    rec = Recorder("adamw").run(16)
    after = rec.after[9 - 1]  # first decompression at step 9
    for name, state in after["state"].items():
        assert int(state["step"]) == 0, name
        assert torch.all(state["exp_avg"] == 0) and torch.all(state["exp_avg_sq"] == 0), name
    assert all(int(s["step"]) == 6 for s in rec.after[6 - 1]["state"].values())  # compression


def test_reset_state_sparse_leaves_dense_parameters_alone():
    rec = Recorder(reset_state="sparse").run(10)
    after = rec.after[9 - 1]
    assert torch.all(after["state"]["fc1.weight"]["momentum_buffer"] == 0)
    assert torch.any(after["state"]["fc1.bias"]["momentum_buffer"] != 0)


def test_uniform_distribution_prunes_every_layer_to_the_target():
    rec = Recorder(distribution="uniform", sparsity=0.75).run(7)
    for name, mask in rec.sp.masks.items():
        assert int(mask.sum()) == mask_ops.n_keep(mask.numel(), 0.75), name


def test_final_model_is_sparse_at_the_target(sgd_run):
    plain = sgd_run.sp.export()
    total = sum(p.numel() for p in sgd_run.sp.params.values())
    nonzero = sum(int((plain.get_parameter(n) != 0).sum()) for n in sgd_run.sp.params)
    assert nonzero <= mask_ops.n_keep(total, 0.9)
    assert _kept(sgd_run.sp.masks) == mask_ops.n_keep(total, 0.9)


# --------------------------------------------------------------------- N:M
def test_nm_masks_are_exact_in_compressed_phases():
    rec = Recorder(sparsity=0.5, nm="2:4", nm_skip_incompatible=True).run()
    assert rec.sp.targets["conv1.weight"] == 0.0  # one input channel: kept dense
    for t, snap in enumerate(rec.after, start=1):
        masks = snap["masks"]
        assert torch.all(masks["conv1.weight"])
        if rec.method.phases.at(t).kind not in st_sparse_kinds():
            assert all(torch.all(m) for m in masks.values()), f"step {t}"
            continue
        for name in ("conv2.weight", "fc1.weight", "fc2.weight"):
            groups = masks[name].movedim(1, -1).reshape(-1, 4)
            assert torch.all(groups.sum(1) == 2), f"step {t} {name}"


def test_nm_errors_name_the_layer_and_the_sparsity():
    with pytest.raises(ConfigError, match=r"conv1\.weight"):
        Recorder(sparsity=0.5, nm=(2, 4))
    with pytest.raises(ConfigError, match="set sparsity to 0.5"):
        Recorder(sparsity=0.9, nm=(2, 4), nm_skip_incompatible=True)


# -------------------------------------------------------------------- pair
def test_dense_export_needs_the_last_dense_phase():
    rec = Recorder().run(40)
    with pytest.raises(ExportError, match="step 51"):
        rec.sp.export(which="dense")
    with pytest.raises(ConfigError, match="which="):
        rec.sp.export(which="both")


def test_dense_export_falls_back_to_the_snapshot_with_a_warning(sgd_run, caplog):
    snap = sgd_run.before[51 - 1]  # end of the last dense phase, before the final compression
    with caplog.at_level(logging.WARNING):
        dense = sgd_run.sp.export(which="dense")
    assert "not been fine-tuned" in caplog.text
    with pytest.raises(ConfigError, match="plain module"):
        sgd_run.sp.export(which="dense", format="compressed")
    fresh = TinyCNN()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    for name, param in dense.named_parameters():
        assert torch.equal(param, snap["params"][name])
    total = sum(p.numel() for p in sgd_run.sp.params.values())
    nonzero = sum(int((dense.get_parameter(n) != 0).sum()) for n in sgd_run.sp.params)
    assert nonzero > 3 * mask_ops.n_keep(total, 0.9)  # restored weights trained while dense


def test_snapshot_survives_a_state_dict_round_trip(sgd_run):
    state = copy.deepcopy(sgd_run.sp.state_dict())
    fresh = st.sparsify(
        TinyCNN(),
        torch.optim.SGD(TinyCNN().parameters(), lr=0.1),
        method="acdc",
        sparsity=0.9,
        total_steps=STEPS,
    )
    fresh.load_state_dict(state)
    assert fresh.method.snapshot["step"] == 51
    torch.testing.assert_close(
        fresh.method.snapshot["model"], sgd_run.method.snapshot["model"], rtol=0, atol=0
    )
    other = st.sparsify(
        TinyCNN(),
        torch.optim.SGD(TinyCNN().parameters(), lr=0.1),
        method="acdc",
        sparsity=0.9,
        total_steps=2 * STEPS,
    )
    with pytest.raises(CheckpointError, match="phases differ"):
        other.load_state_dict(state)


def test_bad_options_are_config_errors():
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="needs total_steps"):
        st.sparsify(model, opt, method="acdc", sparsity=0.9)
    with pytest.raises(ConfigError, match="reset_state"):
        st.sparsify(model, opt, method="acdc", sparsity=0.9, total_steps=60, reset_state="half")
    with pytest.raises(ConfigError, match="one sparsity"):
        st.sparsify(model, opt, method="acdc", sparsity=[0.5, 0.9], total_steps=60)


# ------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    from sparsetrain.train import load_config, train

    # 4 steps per epoch, 40 steps: the final phase starts at step 34, in the middle of epoch 9
    config = load_config(
        None,
        [
            "data.name=synthetic",
            "data.options={num_samples: 128, noise: 1.0}",
            "model.name=mlp",
            "model.width=0.1",
            "train.epochs=10",
            "train.batch_size=32",
            "train.log_every=0",
            "optimizer.lr=0.2",
            "sparsity.method=acdc",
            "sparsity.sparsity=0.9",
            f"train.out={tmp_path_factory.mktemp('acdc')}",
        ],
    )
    return train(config)


def test_training_yields_the_sparse_model_and_its_dense_twin(loop_run):
    from sparsetrain.train import load_checkpoint

    run, sp = loop_run, loop_run.state.sparsifier
    assert sp.method.final_phase == Phase("final_compressed", 34, 40)
    for key in ("sparse_test_acc", "dense_twin_test_acc"):
        assert 0.0 <= run.extras[key] <= 1.0
    assert run.extras["sparse_test_acc"] == run.test_acc
    final = load_checkpoint(run.checkpoint)
    twin = load_checkpoint(run.run_dir / "dense_twin.pt")
    assert run.extras["dense_twin_checkpoint"] == str(run.run_dir / "dense_twin.pt")
    total = sum(p.numel() for p in sp.params.values())
    kept = mask_ops.n_keep(total, 0.9)
    assert sum(int((final["model"][n] != 0).sum()) for n in sp.params) <= kept
    assert sum(int(m.sum()) for m in final["sparsifier"]["masks"].values()) == kept
    assert sum(int((twin["model"][n] != 0).sum()) for n in sp.params) > 0.9 * total
    # the twin branched at step 34 and ran to step 40 on the same lr curve as the sparse model
    assert twin["step"] == final["step"] == 40
    assert twin["scheduler"]["last_epoch"] == final["scheduler"]["last_epoch"] == 40
    assert twin["metrics"]["branched_at_step"] == 34
    lrs = [g["lr"] for g in twin["optimizer"]["param_groups"]]
    assert lrs == [g["lr"] for g in final["optimizer"]["param_groups"]]
    assert twin["config"]["sparsity"]["method"] == "dense"
    assert twin["sparsifier"]["method"] == "dense"
    # the pair is in the method state of final.pt too, and sp.export(which="dense") returns it
    dense = sp.export(which="dense")
    for name, value in dense.state_dict().items():
        assert torch.equal(value, twin["model"][name]), name
        assert torch.equal(final["sparsifier"]["method_state"]["twin"][name], value), name
    records = [
        json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    # the twin finishes epoch 9 from its middle (batch 2 of 4), then runs epoch 10
    twin_records = [r for r in records if r.get("phase") == "dense_twin"]
    assert [(r["epoch"], r["step"], r["sparsity"]) for r in twin_records] == [
        (9, 36, 0),
        (10, 40, 0),
    ]
