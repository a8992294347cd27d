"""Resume: an interrupted run ends bit for bit where an uninterrupted one does, for every method;
bad checkpoints are refused without touching the run; faults during a save lose nothing."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsetrain as st
from sparsetrain.errors import CheckpointError
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train import loop, outputs
from sparsetrain.train.config import load_config
from sparsetrain.train.resume import find_resume
from sparsetrain.train.signals import TrainingInterrupted
from tests.method_cases import CASES, STEPS, STEPS_PER_EPOCH

BATCH = 32
# 320 samples in batches of 32: STEPS_PER_EPOCH steps per epoch, STEPS steps in all, so every
# method's case schedule acts within the run.
TINY = [
    "data.name=synthetic",
    f"data.options.num_samples={BATCH * STEPS_PER_EPOCH}",
    "model.name=small_cnn",
    "model.width=0.25",
    "optimizer.lr=0.05",
    f"train.epochs={STEPS // STEPS_PER_EPOCH}",
    f"train.batch_size={BATCH}",
    "train.log_every=5",
    "train.eval_every=2",
]
INTERRUPT = 23  # odd, in the middle of epoch 3


def method_config(name, out, *extra):
    case = CASES[name]
    options = [f"sparsity.options.{k}={json.dumps(v)}" for k, v in case["options"].items()]
    sparsity = json.dumps(case["sparsity"])
    return load_config(
        None,
        [*TINY, f"sparsity.method={name}", f"sparsity.sparsity={sparsity}", *options]
        + [f"train.out={out}", *extra],
    )


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Plots cost most of a tiny run and are not what these tests check."""
    monkeypatch.setattr(outputs, "plot_training_curves", lambda records, path, **_: path)
    monkeypatch.setattr(outputs, "plot_layer_sparsity", lambda table, path, **_: path)


def signal_at(monkeypatch, step, signum=signal.SIGTERM):
    """Deliver ``signum`` to this process right after optimizer step ``step``."""
    build = loop.build_state

    def build_state(config, data, device):
        state = build(config, data, device)

        def hook(optimizer, args, kwargs):
            if state.sparsifier.step == step:
                os.kill(os.getpid(), signum)

        state.optimizer.register_step_post_hook(hook)
        return state

    monkeypatch.setattr(loop, "build_state", build_state)


def assert_identical(a, b, where="state"):
    """Equal bit for bit: tensors by value and dtype, floats exactly, containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir`` with the sha256 of its content."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", st.list_methods())
def test_interrupted_run_resumes_bit_identical(name, tmp_path, monkeypatch):
    straight = loop.train(method_config(name, tmp_path / "straight"))

    signal_at(monkeypatch, INTERRUPT)
    with pytest.raises(TrainingInterrupted) as stopped:
        loop.train(method_config(name, tmp_path / "resumed"))
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert stopped.value.step == INTERRUPT
    assert f"--resume {tmp_path / 'resumed'}" in str(stopped.value)
    saved = ckpt.load_checkpoint(stopped.value.checkpoint)
    assert (saved["step"], saved["epoch"], saved["progress"]["batch"]) == (INTERRUPT, 2, 3)

    resumed = loop.train(resume=tmp_path / "resumed")
    a, b = straight.state, resumed.state
    assert b.step == a.step == STEPS
    assert_identical(a.model.state_dict(), b.model.state_dict(), "model")
    assert_identical(a.sparsifier.state_dict(), b.sparsifier.state_dict(), "sparsifier")
    assert_identical(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    assert_identical(a.scheduler.state_dict(), b.scheduler.state_dict(), "scheduler")
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in straight.metrics]
    assert_identical(
        drop_time, [{k: v for k, v in r.items() if k != "time"} for r in resumed.metrics]
    )
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines if "phase" not in line] == list(
        range(1, STEPS // STEPS_PER_EPOCH + 1)
    )
    steps = [(run / "steps.jsonl").read_text() for run in (tmp_path / "straight", tmp_path / "resumed")]
    assert steps[0] == steps[1] and steps[0].count("\n") >= STEPS // 5
    paths = {k for k in straight.extras if k.endswith("_checkpoint")}  # files of each run
    assert_identical(
        {k: v for k, v in straight.extras.items() if k not in paths},
        {k: v for k, v in resumed.extras.items() if k not in paths},
    )


@pytest.fixture
def stopped_run(tmp_path, monkeypatch):
    """A SET run stopped by SIGTERM after step 13 (checkpoints at steps 10 and 13)."""
    config = method_config("set", tmp_path / "run")
    signal_at(monkeypatch, 13)
    with pytest.raises(TrainingInterrupted):
        loop.train(config)
    monkeypatch.undo()
    return tmp_path / "run", config


def test_truncated_checkpoint_is_refused_and_the_run_left_intact(stopped_run):
    run_dir, _ = stopped_run
    newest = ckpt.list_checkpoints(run_dir)[-1]
    newest.write_bytes(newest.read_bytes()[:-100])
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="truncated"):
        loop.train(resume=newest)
    assert snapshot(run_dir) == before


def test_corrupted_checkpoint_is_refused_and_the_run_left_intact(stopped_run):
    run_dir, _ = stopped_run
    newest = ckpt.list_checkpoints(run_dir)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    newest.write_bytes(bytes(data))
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="content does not match its sha256"):
        loop.train(resume=newest)
    assert snapshot(run_dir) == before


def test_checkpoint_of_another_method_is_refused(stopped_run):
    run_dir, config = stopped_run
    before = snapshot(run_dir)
    other = method_config("rigl", run_dir)
    with pytest.raises(CheckpointError, match="sparsity.method: 'set' in the checkpoint, 'rigl'"):
        loop.train(other, resume=run_dir)
    longer = load_config(None, [*TINY, "sparsity.method=set", "train.epochs=9"])
    with pytest.raises(CheckpointError, match="train.epochs: 6 in the checkpoint, 9 now"):
        loop.train(longer, resume=run_dir)
    assert snapshot(run_dir) == before


def test_newer_format_is_refused(stopped_run, monkeypatch):
    run_dir, _ = stopped_run
    newest = ckpt.list_checkpoints(run_dir)[-1]
    payload = ckpt.load_checkpoint(newest)
    monkeypatch.setattr(ckpt, "VERSION", ckpt.VERSION + 1)
    ckpt.save_checkpoint(newest, payload)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="newer than this sparsetrain reads"):
        loop.train(resume=newest)


def test_run_dir_skips_a_corrupted_newest_checkpoint(stopped_run, caplog):
    run_dir, config = stopped_run
    older, newest = ckpt.list_checkpoints(run_dir)[-2:]
    newest.write_bytes(newest.read_bytes()[:-1])
    result = loop.train(resume=run_dir)
    assert f"resuming from the older checkpoint {older}" in caplog.text
    assert result.state.step == STEPS


def test_resumable_keys_may_change(stopped_run):
    run_dir, _ = stopped_run
    point = find_resume(run_dir)
    config = point.config(["train.keep=1", "train.log_every=3", "train.eval_every=1"])
    result = loop.train(config, resume=point)
    assert result.state.step == STEPS
    assert len(ckpt.list_checkpoints(run_dir)) == 1
    with pytest.raises(CheckpointError, match="finished"):
        loop.train(resume=run_dir)


def test_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = method_config("rigl", tmp_path, "train.save_every=7", "train.keep=1")
    replace, calls = os.replace, []

    def crash_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the payload is fully written and fsynced, the rename never happens
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_third)
    with pytest.raises(OSError, match="No space left"):
        loop.train(config)
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir())
    assert files == ["step-00000014.pt"]  # no temporary file left behind, the old one kept
    assert ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR / files[0])["step"] == 14
    assert loop.train(resume=tmp_path).state.step == STEPS


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = method_config("static", tmp_path, "train.save_every=5")
    forward = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(logits, y, *args, **kwargs):
        calls.append(1)
        loss = forward(logits, y, *args, **kwargs)
        return loss * math.inf if len(calls) == 8 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(st.SparsetrainError, match="inf or nan.*step-00000005.pt"):
        loop.train(config)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000005.pt"]

    calls.clear()
    skipping = method_config("static", tmp_path / "skip", "train.skip_nonfinite=true")
    result = loop.train(skipping)
    assert result.state.step == STEPS - 1  # the poisoned batch updated nothing
    assert all(torch.isfinite(p).all() for p in result.state.model.parameters())


def test_sigterm_to_the_cli_saves_and_exits_143(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "sparsity.method=static", "train.epochs=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sparsetrain", "train", "--set", *args, "--out", str(run_dir)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not ckpt.list_checkpoints(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert f"resume with: sparsetrain train --resume {run_dir}" in stderr
    newest = ckpt.list_checkpoints(run_dir)[-1]
    saved = ckpt.load_checkpoint(newest)
    assert saved["step"] >= STEPS_PER_EPOCH
    assert not (run_dir / "final.pt").exists()


def test_a_checkpoint_of_another_config_in_the_run_directory_is_refused(stopped_run):
    run_dir, _ = stopped_run
    newest = ckpt.list_checkpoints(run_dir)[-1]
    payload = ckpt.load_checkpoint(newest)
    payload["config"]["sparsity"]["sparsity"] = 0.7  # same shapes, another run
    ckpt.save_checkpoint(newest.with_name("step-00000014.pt"), payload)
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as error:
        loop.train(resume=run_dir)
    message = str(error.value)
    assert f"not a checkpoint of the run in {run_dir}" in message
    assert f"sparsity.sparsity: 0.7 in the checkpoint, 0.8 in {run_dir / 'config.yaml'}" in message
    assert snapshot(run_dir) == before


def test_resuming_an_older_checkpoint_drops_the_later_ones(stopped_run, monkeypatch):
    run_dir, _ = stopped_run
    older = ckpt.list_checkpoints(run_dir)[0]
    signal_at(monkeypatch, 11)
    with pytest.raises(TrainingInterrupted) as stopped:
        loop.train(resume=older)
    names = [p.name for p in ckpt.list_checkpoints(run_dir)]
    assert names == ["step-00000010.pt", "step-00000011.pt"]  # not step 13 of the old timeline
    assert stopped.value.checkpoint.name == names[-1]


@pytest.mark.parametrize("name", ["static", "acdc"])
def test_a_run_resumed_at_its_end_reports_as_if_never_interrupted(name, tmp_path):
    """The state a crash leaves between the end-of-training checkpoint and ``final.pt`` (for
    AC/DC: inside the dense twin's training, which saves no checkpoint)."""
    run_dir = tmp_path / "run"
    loop.train(method_config(name, run_dir))
    straight = json.loads((run_dir / "report.json").read_text())
    for produced in ("final.pt", "report.json", "report.txt", "dense_twin.pt"):
        (run_dir / produced).unlink(missing_ok=True)
    resumed = loop.train(resume=run_dir)
    assert json.loads((run_dir / "report.json").read_text()) == straight
    assert straight["batch_size"] == BATCH and straight["training_flops"]
    assert resumed.report.to_dict() == {k: straight[k] for k in resumed.report.to_dict()}
