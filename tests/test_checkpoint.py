"""Training checkpoints: what they hold, rotation, atomic saves, and the checks behind resuming."""

import json
import os
import stat

import pytest
import torch

from sparsetrain.errors import CheckpointError
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train import loop
from sparsetrain.train.config import load_config
from sparsetrain.train.resume import check_same_run, trim_metrics

TINY = [
    "data.name=synthetic",
    "data.options.num_samples=192",
    "model.name=small_cnn",
    "model.width=0.25",
    "train.batch_size=32",
    "train.log_every=0",
]


def payload(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def test_rotation_keeps_the_newest(tmp_path):
    for step in (5, 10, 99, 100, 150):
        ckpt.save_rotating(tmp_path, payload(step), step, keep=2)
    (tmp_path / ckpt.CHECKPOINT_DIR / ".step-00000200.pt.abc.tmp").write_bytes(b"torn")
    (tmp_path / ckpt.CHECKPOINT_DIR / "notes.txt").write_text("not a checkpoint")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000100.pt", "step-00000150.pt"]
    assert ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])["step"] == 150
    with pytest.raises(CheckpointError, match="keep must be at least 1"):
        ckpt.save_rotating(tmp_path, payload(1), 1, keep=0)


def test_a_failed_save_deletes_nothing_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt.save_rotating(tmp_path, payload(1), 1, keep=1)
    before = sorted(p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir())

    def fail(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt.os, "replace", fail)
    with pytest.raises(OSError, match="Input/output"):
        ckpt.save_rotating(tmp_path, payload(2), 2, keep=1)
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()) == before
    assert ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR / before[0])["step"] == 1


def test_files_follow_the_umask_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path / "a.pt", payload(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    monkeypatch.setattr(ckpt.distributed, "rank", lambda: 1)
    assert ckpt.save_checkpoint(tmp_path / "b.pt", payload(1)) == tmp_path / "b.pt"
    assert not (tmp_path / "b.pt").exists()


@pytest.fixture(scope="module")
def ast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ast")
    config = load_config(
        None,
        [
            *TINY,
            "data.options.num_samples=320",
            "train.epochs=6",
            "train.save_every=7",
            "sparsity.method=ast",
            "sparsity.sparsity=[0.5, 0.75, 0.9]",
            "sparsity.options.update_every=6",
            f"train.out={out}",
        ],
    )
    return loop.train(config)


def test_a_training_checkpoint_holds_everything_a_resume_needs(ast_run):
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(ast_run.run_dir)[0])
    assert (saved["step"], saved["epoch"], saved["progress"]["batch"]) == (56, 5, 6)
    assert saved["config"] == ast_run.config.to_dict()
    sparsifier = saved["sparsifier"]
    assert sparsifier["method"] == "ast" and sparsifier["step"] == 56
    stack = sparsifier["method_state"]["stack"]  # every sub-network's masks, not only the active
    assert stack and all(s.shape[0] == 3 for s in stack.values())
    assert sparsifier["shadow"] is not None  # AST keeps the values under its masks
    assert saved["optimizer"]["state"] and saved["scheduler"]["last_epoch"] == 56
    assert set(saved["rng"]) == {"torch", "cuda", "numpy", "python", "loader"}
    assert saved["sampler"] == {"seed": 0, "epoch": 5, "world_size": 1}
    progress = saved["progress"]
    assert progress["seen"] == 6 * 32 and progress["loss_sum"].dtype == torch.float32
    assert set(saved["model"]) == set(ast_run.state.model.state_dict())


def test_only_the_newest_checkpoints_remain_and_final_is_separate(ast_run):
    names = [p.name for p in ckpt.list_checkpoints(ast_run.run_dir)]
    assert names == ["step-00000056.pt", "step-00000060.pt"]  # keep=2; 60 = end of training
    final = ckpt.load_checkpoint(ast_run.run_dir / "final.pt")
    assert final["step"] == 60 and "subnet0_test_acc" in final["metrics"]


def test_same_run_check_allows_only_how_a_run_executes(tmp_path):
    base = load_config(None, [*TINY, f"train.out={tmp_path}"])
    allowed = load_config(
        None,
        [*TINY, "train.out=elsewhere", "train.device=cpu", "train.keep=5", "train.log_every=7"]
        + ["train.eval_every=3", "train.save_every=11", "train.skip_nonfinite=true"],
    )
    check_same_run(base, allowed, tmp_path / "c.pt")
    for change, message in [
        ("optimizer.lr=0.2", "optimizer.lr: 0.05 in the checkpoint, 0.2 now"),
        ("model.width=0.5", "model.width: 0.25 in the checkpoint, 0.5 now"),
        ("sparsity.sparsity=0.8", "sparsity.sparsity: 0.9 in the checkpoint, 0.8 now"),
        ("data.options.num_samples=64", "data.options.num_samples: 192"),
        ("train.seed=3", "train.seed: 0 in the checkpoint, 3 now"),
        ("sparsity.options.update_every=7", "sparsity.options.update_every: None"),
    ]:
        other = load_config(None, [*TINY, "sparsity.method=set", change])
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
            check_same_run(load_config(None, [*TINY, "sparsity.method=set"]), other, tmp_path)


def test_trim_metrics_drops_what_came_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}, {"epoch": 1, "phase": "dense_twin"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 4, "tra')
    assert trim_metrics(path, 2, write=False) == [{"epoch": 1}, {"epoch": 2}]
    assert len(path.read_text().splitlines()) == 5  # read only
    assert trim_metrics(path, 2) == [{"epoch": 1}, {"epoch": 2}]
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
