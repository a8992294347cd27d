"""P-GaP: the merge rule, sequential runs, and 2 gloo processes against the sequential emulation."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.methods.gap.parallel import merge_workers, pgap_train
from sparsetrain.methods.gap.partitions import by_globs, layer_state_keys
from sparsetrain.train.distributed import tensor_digest as tensor_hash
from tests.conftest import TinyCNN

ROOT = Path(__file__).resolve().parents[1]
# 48 examples in batches of 8: 6 steps per epoch; 2 rounds of 6 steps, then 6 fine-tune steps.
TINY = dict(sparsity=0.8, total_steps=18, batch_size=8, groups=2, rounds=2, step_length=6)
TINY.update(unit="steps", seed=3)


def tiny_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    )


def run_tiny(workers: str = "sequential", **overrides) -> "st.pgap.PGaPResult":
    return pgap_train(TinyCNN, tiny_data(), workers=workers, **{**TINY, **overrides})


def test_merge_takes_each_group_from_its_worker_and_the_rest_from_worker_0():
    states = [
        {
            "a.weight": torch.full((2,), float(k)),
            "a.bias": torch.full((1,), 10.0 + k),
            "b.weight": torch.full((2,), 20.0 + k),
            "norm.mean": torch.tensor([0.1, 0.2]) * (k + 1),
            "norm.count": torch.tensor(5 + k),
        }
        for k in range(3)
    ]
    merged = merge_workers(states, [["a.weight", "a.bias"], [], ["b.weight"]])
    assert merged["a.weight"].tolist() == [0.0, 0.0] and merged["a.bias"].item() == 10.0
    assert merged["b.weight"].tolist() == [22.0, 22.0]
    assert torch.equal(merged["norm.mean"], states[0]["norm.mean"])  # in no group: worker 0's
    assert merged["norm.count"].item() == 5
    partial = [{"g0": torch.ones(1), "x": torch.ones(1)}, {"g1": torch.zeros(1)}]
    merged = merge_workers(partial, [["g0"], ["g1"]])
    assert merged == {"g0": torch.ones(1), "x": torch.ones(1), "g1": torch.zeros(1)}


def test_merge_takes_each_groups_batchnorm_from_the_worker_that_grew_its_conv():
    model = TinyCNN()
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    group_keys = [
        layer_state_keys(model, names)
        for names in by_globs(params, [["conv1"], ["conv2", "fc*"]]).groups
    ]
    states = []
    for k in range(2):
        torch.manual_seed(k)
        model.train()
        model(torch.randn(8, 1, 16, 16) + k)  # each worker's own running statistics
        for p in model.parameters():
            p.data.add_(torch.randn_like(p))
        states.append({key: v.clone() for key, v in model.state_dict().items()})
    merged = merge_workers(states, group_keys)
    for k, bn in enumerate(["bn1", "bn2"]):
        for local in ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]:
            key = f"{bn}.{local}"
            assert torch.equal(merged[key], states[k][key]), key
            assert (
                not torch.equal(merged[key], states[1 - k][key]) or local == "num_batches_tracked"
            )
    assert torch.equal(merged["conv1.weight"], states[0]["conv1.weight"])
    assert torch.equal(merged["bn2.running_var"], states[1]["bn2.running_var"])


def test_sequential_run_ends_at_the_ratios_and_is_reproducible():
    result = run_tiny()
    sp = result.sparsifier
    assert sp.targets["conv1.weight"] == 0.0 and bool(sp.mask("conv1.weight").all())  # the stem
    assert "conv1.weight" not in {n for names in result.partition.groups for n in names}
    for name, p in sp.params.items():
        expected = 0.0 if name == "conv1.weight" else 0.8
        assert int(sp.mask(name).sum()) == mask_ops.n_keep(p.numel(), expected), name
        assert torch.all(p[~sp.mask(name)] == 0)
    assert [r["phase"] for r in result.records] == ["pgap_round", "pgap_round", "finetune"]
    assert [r["step"] for r in result.records] == [6, 12, 18]
    assert len(result.merge_hashes) == 2 and result.rounds == 2
    again = run_tiny()
    assert again.merge_hashes == result.merge_hashes and again.mask_hash == result.mask_hash
    assert run_tiny(seed=4).merge_hashes[0] != result.merge_hashes[0]


def test_ungrouped_layers_keep_their_initial_random_mask():
    result = run_tiny(groups=None, partition=[["conv*"], ["fc1"]])
    assert result.partition.ungrouped == ("fc2.weight",)
    sp = result.sparsifier
    initial = mask_ops.random_mask(
        sp.params["fc2.weight"].shape,
        mask_ops.n_keep(sp.params["fc2.weight"].numel(), 0.8),
        mask_ops.generator_for(TINY["seed"], "fc2.weight", 0),
    )
    assert torch.equal(sp.mask("fc2.weight"), initial)


def test_every_worker_and_the_finetune_restart_a_linear_lr_warm_up():
    lrs: list[float] = []

    def optimizer_fn(params):
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
        return opt

    run_tiny(optimizer_fn=optimizer_fn, restart_warmup=0.5)
    ramp = [0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.1]  # phases of 6 steps, W = 3
    assert lrs == pytest.approx(ramp * 5)  # 2 rounds x 2 workers, then the fine-tune


def test_the_runner_scales_warm_up_and_milestones_to_each_phase():
    from sparsetrain.train.config import LRScheduleConfig
    from sparsetrain.train.parallel_gap import phase_lr_factor

    # A 10-epoch run of 10 steps per epoch; a phase of 20 steps (a fifth of the run).
    warm = phase_lr_factor(LRScheduleConfig("constant", warmup_epochs=5.0), 10, 100, 20)
    assert [warm(t) for t in (0, 9, 10, 19)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    step = phase_lr_factor(LRScheduleConfig("step", milestones=(5.0, 7.5)), 10, 100, 20)
    assert [step(t) for t in (9, 10, 14, 15)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_batchnorm_statistics_are_recalibrated_after_each_prune_back():
    def counts(**options):
        result = run_tiny(total_steps=12, **options)  # 2 rounds, no fine-tune
        bns = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(m.momentum == 0.1 for m in bns)
        return [int(m.num_batches_tracked) for m in bns], [m.running_var.clone() for m in bns]

    recalibrated, var = counts(recalibrate_bn=5)
    stale, stale_var = counts(recalibrate_bn=0)
    assert recalibrated == [5, 5] and stale == [12, 12]  # reset + 5 batches / 2 rounds of 6
    assert not torch.equal(var[1], stale_var[1])


class _Indexed(Dataset):
    """Inputs with their own index as the target, so the loss sees which examples trained."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i


@pytest.mark.parametrize("shard", [False, True])
def test_workers_train_on_all_data_or_on_their_shard(shard):
    seen: list[list[int]] = []

    def loss_fn(out, index):
        seen.append(index.tolist())
        return nn.functional.cross_entropy(out, index % 2)

    model_fn = lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))  # noqa: E731
    pgap_train(
        model_fn,
        _Indexed(24),
        sparsity=0.5,
        total_steps=8,
        batch_size=4,
        groups=2,
        rounds=1,
        step_length=4,
        unit="steps",
        shard=shard,
        loss_fn=loss_fn,
    )
    workers = [sorted(sum(seen[k * 4 : k * 4 + 4], [])) for k in range(2)]
    for k, indices in enumerate(workers):
        residues = {i % 2 for i in indices}
        assert residues == ({k} if shard else {0, 1})
    assert {i % 2 for i in sum(seen[8:], [])} == {0, 1}  # the fine-tune uses all the data


def test_bad_setups_are_errors(monkeypatch):
    with pytest.raises(st.ConfigError, match="workers"):
        run_tiny("bogus")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(st.ConfigError, match="torchrun"):
        run_tiny("distributed")
    with pytest.raises(st.ConfigError, match="fresh optimizer"):
        run_tiny(restart_optimizer=False)
    with pytest.raises(st.ConfigError, match="unknown option"):
        run_tiny(bogus=1)


RANK_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from tests.test_pgap import run_tiny
result = run_tiny("distributed")
state = {k: v.clone() for k, v in result.model.state_dict().items()}
torch.save({"state": state, "merges": result.merge_hashes, "masks": result.mask_hash,
            "world": result.world_size, "rank": result.rank}, sys.argv[1])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_the_sequential_emulation(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(tmp_path / f"rank{rank}.pt")],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran single-threaded: same kernels, same bits
    try:
        sequential = run_tiny("sequential")
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    for rank in ranks:
        assert rank["merges"] == sequential.merge_hashes  # the merged models, round by round
        assert rank["masks"] == sequential.mask_hash == tensor_hash(sequential.sparsifier.masks)
        assert rank["state"].keys() == sequential.model.state_dict().keys()
        for key, value in sequential.model.state_dict().items():
            assert torch.equal(rank["state"][key], value), key


def test_sparsetrain_train_runs_parallel_gap_through_the_driver(tmp_path):
    from sparsetrain.train import config_from_dict, train

    config = config_from_dict(
        {
            "model": {"name": "mlp", "width": 0.25},
            "data": {"name": "synthetic", "options": {"num_samples": 128, "image_size": 8}},
            "train": {"epochs": 2, "batch_size": 32, "out": str(tmp_path / "run")},
            "sparsity": {
                "method": "gap",
                "sparsity": 0.8,
                "options": {"parallel": True, "groups": 2},
            },
        }
    )
    result = train(config)
    assert result.extras["pgap_groups"] == 2 and result.extras["pgap_processes"] == 1
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["phase"] for r in records] == ["pgap_round", "pgap_round", "finetune"]
    assert all("test_acc" in r for r in records)
    assert (tmp_path / "run" / "final.pt").exists() and (tmp_path / "run" / "report.json").exists()
    assert result.report.sparsity.rows and abs(result.state.sparsifier.sparsity - 0.8) < 0.01
