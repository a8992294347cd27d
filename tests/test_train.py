"""Training loop, lr schedule and checkpoint files, on the synthetic dataset and a tiny MLP."""

import json
import math

import pytest
import torch

from sparsetrain.errors import CheckpointError
from sparsetrain.methods.static import Static
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.config import LRScheduleConfig, load_config
from sparsetrain.train.loop import train
from sparsetrain.train.optim import lr_factor

TINY = [
    "data.name=synthetic",
    "data.options.noise=1.0",
    "model.name=mlp",
    "model.width=0.5",
    "sparsity.method=static",
    "sparsity.sparsity=0.5",
    "optimizer.lr=0.2",
    "train.epochs=2",
    "train.batch_size=64",
]


def tiny_config(out, *extra):
    return load_config(None, [*TINY, f"train.out={out}", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("run")))


def test_run_writes_every_artifact(run):
    names = {p.name for p in run.run_dir.iterdir()}
    expected = {"config.yaml", "metrics.jsonl", "final.pt", "report.txt", "report.json"}
    assert expected | {"curves.png", "layer_sparsity.png"} <= names
    assert all(p.stat().st_size > 0 for p in run.plots)
    assert load_config(run.run_dir / "config.yaml") == run.config  # the resolved config


def test_metrics_records(run):
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    steps_per_epoch = 1024 // 64
    assert [r["step"] for r in records] == [steps_per_epoch, 2 * steps_per_epoch]
    keys = {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "sparsity", "time"}
    assert all(keys <= r.keys() for r in records)
    assert records[-1]["test_acc"] == run.test_acc
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    assert records[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_learns_well_above_chance(run):
    assert run.test_acc > 0.5  # 10 classes: chance is 0.1


def test_report_and_checkpoint_agree_with_the_masks(run):
    sp = run.state.sparsifier
    report = json.loads((run.run_dir / "report.json").read_text())
    assert report["sparsity"]["sparsity"] == pytest.approx(sp.sparsity)
    assert report["steps"] == sp.step == run.metrics[-1]["step"]
    assert 0 < report["training_flops"] < report["training_flops_dense"]
    assert "fc1.weight" in (run.run_dir / "report.txt").read_text()

    saved = ckpt.load_checkpoint(run.checkpoint)
    assert saved["epoch"] == 2 and saved["step"] == sp.step
    assert saved["metrics"]["test_acc"] == run.test_acc
    for name, mask in saved["sparsifier"]["masks"].items():
        assert torch.equal(mask, sp.masks[name])
        assert not saved["model"][name][~mask].any()  # masked weights are exactly zero


def test_same_config_twice_gives_identical_weights(run, tmp_path):
    again = train(tiny_config(tmp_path / "again"))
    first, second = run.state.model.state_dict(), again.state.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.metrics[-1]["train_loss"] == run.metrics[-1]["train_loss"]


def test_different_seed_gives_different_weights(run, tmp_path):
    other = train(tiny_config(tmp_path / "other", "train.seed=1", "train.epochs=1"))
    assert not torch.equal(
        other.state.model.state_dict()["fc1.weight"], run.state.model.state_dict()["fc1.weight"]
    )


def test_eval_every_skips_evaluation_but_not_the_last_epoch(tmp_path):
    result = train(tiny_config(tmp_path, "train.epochs=3", "train.eval_every=2"))
    tested = [r["test_acc"] is not None for r in result.metrics]
    assert tested == [False, True, True]


def test_after_training_hook_sees_the_run_and_its_results_are_kept(tmp_path, monkeypatch):
    seen = {}

    def after_training(self, ctx):
        seen["epoch"] = ctx.state.epoch
        records = ctx.run_epochs(ctx.state, 1, phase="extra")
        _, acc = ctx.evaluate(ctx.state.model)
        return {"extra_test_acc": acc, "extra_epochs": len(records)}

    monkeypatch.setattr(Static, "after_training", after_training, raising=False)
    result = train(tiny_config(tmp_path, "train.epochs=1"))
    assert seen == {"epoch": 1}
    assert result.extras["extra_epochs"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in records] == [None, "extra"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extras"] == result.extras
    assert ckpt.load_checkpoint(result.checkpoint)["metrics"]["extra_epochs"] == 1


# ------------------------------------------------------------------ lr schedule
def test_cosine_with_warmup():
    factor = lr_factor(LRScheduleConfig(name="cosine", warmup_epochs=1.0), 10, 50)
    assert [factor(t) for t in range(10)] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert factor(10) == pytest.approx(1.0)
    assert factor(30) == pytest.approx(0.5)
    assert factor(50) == pytest.approx(0.0, abs=1e-12)


def test_step_and_constant():
    step = lr_factor(LRScheduleConfig(name="step", milestones=(1, 2.5), gamma=0.1), 10, 40)
    assert [step(t) for t in (0, 9, 10, 24, 25)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    constant = lr_factor(LRScheduleConfig(name="constant"), 10, 40)
    assert {constant(t) for t in range(40)} == {1.0}


# ------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved(tmp_path):
    payload = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "metrics": {"a": 0.5}}
    return ckpt.save_checkpoint(tmp_path / "c.pt", payload), payload


def test_checkpoint_round_trip(saved):
    path, payload = saved
    loaded = ckpt.load_checkpoint(path)
    assert loaded["format"] == ckpt.FORMAT and loaded["version"] == ckpt.VERSION
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert loaded["epoch"] == 3 and loaded["metrics"] == {"a": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left


def test_flipped_byte_is_refused(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*corrupt"):
        ckpt.load_checkpoint(path)


def test_truncated_file_is_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
        ckpt.load_checkpoint(path)


def test_newer_version_is_refused(saved, monkeypatch):
    path, payload = saved
    monkeypatch.setattr(ckpt, "VERSION", ckpt.VERSION + 1)
    ckpt.save_checkpoint(path, payload)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="newer"):
        ckpt.load_checkpoint(path)


def test_other_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match="not a sparsetrain checkpoint"):
        ckpt.load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path / "r.pt", {"rng": ckpt.capture_rng(generator)})
    expected = (
        torch.rand(3),
        np.random.rand(),
        random.random(),
        torch.rand(2, generator=generator),
    )
    torch.rand(7), np.random.rand(5), random.random(), torch.rand(4, generator=generator)
    ckpt.restore_rng(ckpt.load_checkpoint(path)["rng"], generator)
    again = (torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=generator))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[3], again[3])
    assert math.isclose(expected[1], again[1]) and expected[2] == again[2]


# ------------------------------------------------------------- report summary
def test_training_flops_follow_the_density_at_each_step():
    import torch.nn.functional as F
    from torch import nn

    import sparsetrain as st

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, method="dense", sparsity=0.0)
    x, y = torch.randn(5, 4, 4), torch.randint(0, 4, (5,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    step()  # two dense steps, then two steps with layer 1 at density 1/4
    sp.set_mask("1.weight", torch.arange(128).view(8, 16) % 4 == 0)
    step()
    step()
    report = sp.report()
    assert report.flops.per_module == {"1": (256, 64), "3": (64, 64)}
    forward = 2 * (256 + 64) + 2 * (64 + 64)  # per example, summed over the four steps
    assert report.training_flops == 3 * 5 * forward
    assert report.training_flops_dense == 3 * 5 * 4 * (256 + 64)
    assert "training FLOPs so far (4 steps of batch 5)" in str(report)
