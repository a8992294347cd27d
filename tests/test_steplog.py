"""Per-step records (steps.jsonl, TensorBoard): which steps, what they hold, and that recording
them changes nothing in training."""

import json
import sys

import pytest

from sparsetrain.errors import ConfigError
from sparsetrain.train import loop, outputs
from sparsetrain.train.config import load_config

TINY = [
    "data.name=synthetic",
    "data.options.num_samples=320",
    "model.name=mlp",
    "model.width=0.25",
    "train.epochs=4",
    "train.batch_size=32",
    "train.eval_every=2",
]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(outputs, "plot_training_curves", lambda records, path, **_: path)
    monkeypatch.setattr(outputs, "plot_layer_sparsity", lambda table, path, **_: path)


def run(tmp_path, name, *extra):
    return loop.train(load_config(None, [*TINY, f"train.out={tmp_path / name}", *extra]))


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steps_jsonl_has_every_log_every_step_and_every_acdc_phase_boundary(tmp_path):
    result = run(tmp_path, "acdc", "train.log_every=7")
    records = read(result.run_dir / "steps.jsonl")
    main = [r for r in records if "phase" not in r]
    boundaries = {p.start_step for p in result.state.sparsifier.method.phases if p.start_step}
    expected = {1} | set(range(7, 41, 7)) | {10, 20, 30, 40} | boundaries  # + epoch ends
    assert [r["step"] for r in main] == sorted(expected)
    assert sorted({round(r["sparsity"], 2) for r in main}) == [0.0, 0.9]
    first = main[0]
    assert first["epoch"] == 1 and first["lr"] == 0.05 and first["loss"] > 0
    assert set(first["density"]) == set(result.state.sparsifier.params)
    twin = [r for r in records if r.get("phase") == "dense_twin"]
    final = result.state.sparsifier.method.final_phase
    assert twin and all(final.start_step < r["step"] <= final.end_step for r in twin)
    assert all(r["sparsity"] == 0.0 for r in twin)
    epochs = read(result.run_dir / "metrics.jsonl")
    assert [r.get("phase") for r in epochs] == [None] * 4 + ["dense_twin"]


def test_recording_steps_changes_no_result(tmp_path):
    quiet = run(tmp_path, "quiet", "train.log_every=0")
    loud = run(tmp_path, "loud", "train.log_every=1", "train.loggers=[tensorboard]")
    for name, tensor in quiet.state.model.state_dict().items():
        assert tensor.equal(loud.state.model.state_dict()[name]), name
    assert quiet.extras == {
        k: v if not k.endswith("_checkpoint") else quiet.extras[k] for k, v in loud.extras.items()
    }
    assert len(read(loud.run_dir / "steps.jsonl")) > 40  # every step, the twin's too


def test_tensorboard_gets_the_step_scalars_per_layer_sparsity_and_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(tmp_path, "tb", "train.log_every=5", "train.loggers=[tensorboard]")
    main = EventAccumulator(str(result.run_dir / "tensorboard" / "main")).Reload()
    scalars = set(main.Tags()["scalars"])
    assert {"train/loss", "train/lr", "sparsity/overall", "epoch/test_acc"} <= scalars
    assert {f"sparsity/{name}" for name in result.state.sparsifier.params} <= scalars
    steps = [r["step"] for r in read(result.run_dir / "steps.jsonl") if "phase" not in r]
    assert [e.step for e in main.Scalars("train/loss")] == steps
    assert "config" in " ".join(main.Tags()["tensors"])
    twin = EventAccumulator(str(result.run_dir / "tensorboard" / "dense_twin")).Reload()
    assert "train/loss" in twin.Tags()["scalars"]


def test_tensorboard_missing_or_unknown_logger_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.loggers: unknown 'wandb'"):
        load_config(None, ["train.loggers=[wandb]"])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="pip install 'sparsetrain\\[tensorboard\\]'"):
        run(tmp_path, "none", "train.loggers=[tensorboard]")
    assert not (tmp_path / "none").exists()
