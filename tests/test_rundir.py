"""One run per directory: a new run refuses another run's directory (or overwrites it when told),
a restart tidies away the temporary files of torn saves."""

import pytest

from sparsetrain.errors import ConfigError
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train import loop
from sparsetrain.train.rundir import clear_run
from sparsetrain.train.signals import TrainingInterrupted
from tests.method_cases import STEPS
from tests.test_resume import method_config, no_plots, signal_at, snapshot  # noqa: F401

SPARSITY = "sparsity.sparsity=0.7"  # another run: the cases train at 0.8


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A SET run stopped by SIGTERM after step 13 (checkpoints at steps 10 and 13)."""
    signal_at(monkeypatch, 13)
    with pytest.raises(TrainingInterrupted):
        loop.train(method_config("set", tmp_path / "run"))
    monkeypatch.undo()
    return tmp_path / "run"


def test_a_new_run_refuses_the_directory_of_an_interrupted_one(interrupted):
    before = snapshot(interrupted)
    with pytest.raises(ConfigError) as error:
        loop.train(method_config("set", interrupted, SPARSITY))
    message = str(error.value)
    assert f"{interrupted} already holds the checkpoints of a run (up to step 13)" in message
    assert f"--resume {interrupted}" in message and "--overwrite" in message
    assert snapshot(interrupted) == before


def test_overwrite_starts_over_with_nothing_of_the_old_run(interrupted, monkeypatch):
    (interrupted / "notes.txt").write_text("mine")
    signal_at(monkeypatch, 16)
    with pytest.raises(TrainingInterrupted) as stopped:
        loop.train(method_config("set", interrupted, SPARSITY), overwrite=True)
    monkeypatch.undo()
    saved = ckpt.list_checkpoints(interrupted)
    assert [p.name for p in saved] == ["step-00000010.pt", "step-00000016.pt"]
    assert stopped.value.checkpoint == saved[-1] and saved[-1].exists()
    assert all(ckpt.load_checkpoint(p)["config"]["sparsity"]["sparsity"] == 0.7 for p in saved)
    assert (interrupted / "notes.txt").read_text() == "mine"  # not a file of the run
    result = loop.train(resume=interrupted)
    assert result.state.step == STEPS and result.config.sparsity.sparsity == 0.7


def test_a_finished_run_is_refused_too(interrupted):
    loop.train(resume=interrupted)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        loop.train(method_config("set", interrupted))
    with pytest.raises(ConfigError, match="overwrite cannot be combined with resume"):
        loop.train(resume=interrupted, overwrite=True)


def test_clear_run_deletes_the_files_of_a_run_only(interrupted):
    (interrupted / "notes.txt").write_text("mine")
    clear_run(interrupted)
    assert sorted(p.name for p in interrupted.iterdir()) == ["notes.txt"]


def torn_saves(run_dir):
    """The temporary files a kill inside ``save_checkpoint`` leaves behind."""
    folder = run_dir / ckpt.CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / ".step-00000016.pt.k2j4x.tmp", run_dir / ".final.pt.a8d0q.tmp"]
    for path in paths:
        path.write_bytes(b"sparsetrain-checkpoint {")
    return paths


def test_a_resume_removes_the_temporary_files_of_torn_saves(interrupted):
    paths = torn_saves(interrupted)
    loop.train(resume=interrupted)
    assert not any(p.exists() for p in paths)


def test_a_new_run_removes_them_too(tmp_path):
    paths = torn_saves(tmp_path)  # killed inside its first save: no checkpoint, nothing to lose
    loop.train(method_config("static", tmp_path))
    assert not any(p.exists() for p in paths)
