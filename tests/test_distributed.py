"""Multi-process training: two gloo processes under torchrun agree bit for bit and resume exactly;
the sampler and the collective helpers behave the same with one process or several."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain.errors import ConfigError
from sparsetrain.train import distributed
from sparsetrain.train.sampler import EpochBatchSampler

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_processes_hold_identical_masks_and_weights_and_resume_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(WORKER), str(tmp_path), "rigl", "acdc"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("rigl", "acdc"):
        first, second = ranks[0][name], ranks[1][name]
        assert first["masks"] == second["masks"]
        assert first["weights"] == second["weights"]
        # weights, masks, optimizer state and BatchNorm statistics, on both ranks
        assert first["straight"] == second["straight"]
        # only rank 0 received SIGTERM; both stopped at the same step boundary
        assert first["stopped"] == second["stopped"] == 13
        assert first["resumed"] == first["straight"] and second["resumed"] == second["straight"]
        # the gradient the method sees at a mask update is the all-reduced one: equal on both
        # ranks although each computed its own on a different half of the batch
        assert first["grads"] and first["grads"] == second["grads"]
        dense_steps = [k for k in first["grads"] if k.startswith("dense")]
        assert bool(dense_steps) == (name == "rigl")  # RigL ranks dense gradients, AC/DC none
        run_dir = tmp_path / name / "resumed"
        records = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in records if "phase" not in r] == [1, 2, 3, 4, 5, 6]
    for report in ranks:
        assert "masks differ across ranks after step 7: ranks [1]" in report["mismatch"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_the_number_of_processes(world_size):
    single = EpochBatchSampler(100, 8, seed=3)
    shards = [
        EpochBatchSampler(100, 8, seed=3, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for sampler in (single, *shards):
        sampler.set_epoch(5)
    assert len(single) == 12 and all(len(s) == 12 for s in shards)
    for batch, *parts in zip(single, *shards, strict=True):
        assert sum(parts, []) == batch
        assert all(len(p) == 8 // world_size for p in parts)


def test_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    a, b = EpochBatchSampler(50, 5, seed=1), EpochBatchSampler(50, 5, seed=1)
    a.set_epoch(3)
    first = list(a)
    list(a)  # drawing an epoch does not advance any hidden state
    a.set_epoch(3)
    assert list(a) == first
    b.set_epoch(3, start=4)
    assert list(b) == first[4:]
    assert list(b) == first  # the skip applies to one iteration only
    b.set_epoch(4)
    assert list(b) != first
    assert sorted(sum(first, [])) == list(range(50))
    with pytest.raises(ConfigError, match="divisible"):
        EpochBatchSampler(50, 5, seed=1, world_size=2)


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu") is None
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    t = torch.tensor([1.5, 2.0])
    assert distributed.all_sum(t) is t and t.tolist() == [1.5, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    masks = {"w": torch.tensor([True, False])}
    assert distributed.check_same_masks(masks, 1) == distributed.tensor_digest(masks)


def test_tensor_digest_sees_every_bit():
    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([True, False])}
    assert distributed.tensor_digest(base) == distributed.tensor_digest(
        dict(reversed(base.items()))
    )
    a = base["a"].clone()
    a[1] = torch.nextafter(a[1], torch.tensor(3.0))  # one unit in the last place
    nudged = {**base, "a": a}
    assert distributed.tensor_digest(nudged) != distributed.tensor_digest(base)
    assert distributed.tensor_digest({**base, "b": base["b"].int()}) != distributed.tensor_digest(
        base
    )


def test_mask_check_interval_and_a_partial_torchrun_environment(monkeypatch):
    assert distributed.mask_check_interval(0) == 0
    monkeypatch.setenv(distributed.CHECK_MASKS_ENV, "25")
    assert distributed.mask_check_interval(0) == 25
    monkeypatch.setenv(distributed.CHECK_MASKS_ENV, "often")
    with pytest.raises(ConfigError, match="number of steps"):
        distributed.mask_check_interval(0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="start multi-process training with torchrun"):
        distributed.init_distributed("cpu")


def test_tensor_collectives_are_identities_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tensors = [torch.tensor([1.5, 2.0]), torch.tensor(3)]
    distributed.broadcast_tensors(tensors, src=0)
    assert tensors[0].tolist() == [1.5, 2.0] and tensors[1].item() == 3
    gathered = distributed.all_gather_tensors(tensors)
    assert len(gathered) == 1 and all(a is b for a, b in zip(gathered[0], tensors, strict=True))
    assert distributed.all_gather_object({"loss": 0.5}) == [{"loss": 0.5}]


COLLECTIVES = """
import json, sys, torch
from sparsetrain.train import distributed
world = distributed.init_distributed("cpu")
r = world.rank
# mixed dtypes, interleaved: one flat buffer per dtype must come back in the original order
mine = [torch.full((2, 3), r + 0.5), torch.tensor([10 * r, 11 * r]), torch.tensor(r * 1.0),
        torch.tensor([r, r + 1], dtype=torch.int32)]
gathered = distributed.all_gather_tensors(mine)
shared = [t.clone() for t in mine]
distributed.broadcast_tensors(shared, src=1)
out = {"gathered": [[[t.dtype == m.dtype, t.tolist()] for t, m in zip(copy, mine)]
                    for copy in gathered],
       "broadcast": [[str(t.dtype), t.tolist()] for t in shared],
       "objects": distributed.all_gather_object(f"rank{r}")}
open(f"{sys.argv[1]}/rank{r}.json", "w").write(json.dumps(out))
"""


def test_tensor_collectives_over_two_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = [
        [[True, [[r + 0.5] * 3] * 2], [True, [10 * r, 11 * r]], [True, r * 1.0], [True, [r, r + 1]]]
        for r in (0, 1)
    ]
    for result in ranks:
        assert result["gathered"] == expected
        assert result["broadcast"] == [
            ["torch.float32", [[1.5] * 3] * 2],
            ["torch.int64", [10, 11]],
            ["torch.float32", 1.0],
            ["torch.int32", [1, 2]],
        ]
        assert result["objects"] == ["rank0", "rank1"]
