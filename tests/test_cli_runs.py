"""The command line as a user runs it (a subprocess on tiny synthetic runs): two runs never share
a directory, resume checks what it picks, reports survive a resume, bad values are one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsetrain.train import checkpoint as ckpt
from tests.test_resume import snapshot

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=synthetic",
    "data.options.num_samples=256",
    "model.name=mlp",
    "model.width=0.5",
    "sparsity.method=static",
    "optimizer.lr=1e-1",  # YAML 1.1 alone would read this as a string
    "train.epochs=2",
    "train.batch_size=64",
]
STEPS = 8  # 4 per epoch


def sparsetrain(*args: str) -> subprocess.CompletedProcess:
    """``python -m sparsetrain -q ARGS`` with this checkout's package."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "sparsetrain", "-q", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The message of a clean user error: exit 2, one ``sparsetrain: error:`` line."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsetrain: error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run at sparsity 0.5; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("cli_runs") / "run"
    done = sparsetrain("train", "--set", *TINY, "sparsity.sparsity=0.5", "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture
def interrupted(finished, tmp_path):
    """A copy of the run as a crash before ``final.pt`` leaves it: every checkpoint is there."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for produced in ("final.pt", "report.txt", "report.json"):
        (run_dir / produced).unlink()
    return run_dir


def test_numbers_in_exponent_form_are_accepted(finished):
    assert yaml.safe_load((finished / "config.yaml").read_text())["optimizer"]["lr"] == 0.1


def test_a_second_run_refuses_the_directory_then_overwrites_it(interrupted):
    before = snapshot(interrupted)
    other = ["train", "--set", *TINY, "sparsity.sparsity=0.8", "--out", str(interrupted)]
    message = one_error_line(sparsetrain(*other))
    assert f"{interrupted} already holds the checkpoints of a run (up to step {STEPS})" in message
    assert f"--resume {interrupted}" in message and "--overwrite" in message
    assert snapshot(interrupted) == before

    assert sparsetrain(*other, "--overwrite").returncode == 0
    saved = [ckpt.load_checkpoint(p) for p in ckpt.list_checkpoints(interrupted)]
    assert saved and all(s["config"]["sparsity"]["sparsity"] == 0.8 for s in saved)
    assert yaml.safe_load((interrupted / "config.yaml").read_text())["sparsity"]["sparsity"] == 0.8


def test_resume_refuses_a_checkpoint_of_another_config(interrupted):
    newest = ckpt.list_checkpoints(interrupted)[-1]
    payload = ckpt.load_checkpoint(newest)
    payload["config"]["sparsity"]["sparsity"] = 0.8
    ckpt.save_checkpoint(newest.with_name(f"step-{STEPS + 1:08d}.pt"), payload)
    before = snapshot(interrupted)
    message = one_error_line(sparsetrain("train", "--resume", str(interrupted)))
    assert "not a checkpoint of the run" in message
    assert "sparsity.sparsity: 0.8 in the checkpoint, 0.5 in" in message
    assert snapshot(interrupted) == before


def test_resume_at_the_end_reports_the_same_and_removes_torn_saves(finished, interrupted):
    torn = [
        interrupted / ckpt.CHECKPOINT_DIR / f".step-{STEPS:08d}.pt.x1y2z3.tmp",
        interrupted / ".final.pt.q8r7s6.tmp",
    ]
    for path in torn:
        path.write_bytes(b"sparsetrain-checkpoint {")
    done = sparsetrain("train", "--resume", str(interrupted))
    assert done.returncode == 0, done.stderr
    report = json.loads((interrupted / "report.json").read_text())
    assert report == json.loads((finished / "report.json").read_text())
    assert report["batch_size"] == 64 and report["training_flops"]
    assert not any(path.exists() for path in torn)


def test_an_option_of_the_wrong_type_is_one_line():
    done = sparsetrain("train", "--set", *TINY, "sparsity.method=set", "sparsity.options.zeta=x")
    message = one_error_line(done)
    assert "'sparsity.options.zeta' of method 'set' must be a finite number, got 'x'" in message


def test_a_one_epoch_smoke_run_of_the_default_method_trains(tmp_path):
    """The default method (AC/DC) on 8 steps: phases of one step, said in a warning."""
    overrides = ["data.name=synthetic", "model.name=mlp", "train.epochs=1"]
    done = sparsetrain("train", "--set", *overrides, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "too short for the imagenet preset" in done.stderr
    assert (tmp_path / "run" / "dense_twin.pt").is_file()
