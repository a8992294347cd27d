"""Task metrics, and the training loop and CLI on a language model (configs/gpt_char.yaml)."""

import contextlib
import io
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from sparsetrain import cli, tasks
from sparsetrain.errors import ConfigError
from sparsetrain.train import builders, loop, outputs
from sparsetrain.train.config import load_config
from sparsetrain.train.signals import TrainingInterrupted
from tests.test_resume import assert_identical, signal_at
from tests.text_corpus import write_corpus

TINY = [
    "model.options={n_layer: 2, n_head: 2, n_embd: 32}",
    "data.options={block_size: 32, max_train_tokens: 8192, max_val_tokens: 2048}",
    "train.epochs=3",
    "train.batch_size=16",
    "train.log_every=0",
    "optimizer.lr=0.005",
]  # 256 windows: 16 steps per epoch


def test_loss_and_accuracy_are_per_prediction():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.equal(tasks.loss(logits, labels), F.cross_entropy(logits, labels))
    assert int(tasks.correct(logits, labels)) == int((logits.argmax(1) == labels).sum())
    seq, targets = torch.randn(2, 3, 5, generator=g), torch.randint(0, 5, (2, 3), generator=g)
    per_token = [F.cross_entropy(seq[b, t], targets[b, t]) for b in range(2) for t in range(3)]
    torch.testing.assert_close(tasks.loss(seq, targets), torch.stack(per_token).mean())
    assert int(tasks.correct(seq, targets)) == int((seq.argmax(-1) == targets).sum())


def test_bits_per_byte_and_descriptions():
    assert tasks.derived_metrics(tasks.CLASSIFICATION, 0.5) == {}
    assert tasks.derived_metrics(tasks.LANGUAGE_MODEL, math.log(4), "test_") == {"test_bpb": 2.0}
    assert tasks.derived_metrics(tasks.LANGUAGE_MODEL, None, "test_") == {"test_bpb": None}
    assert tasks.describe(tasks.CLASSIFICATION, 0.30119, 0.891) == "loss 0.3012 acc 89.10%"
    assert (
        tasks.describe(tasks.LANGUAGE_MODEL, math.log(4), 0.5) == "loss 1.3863 bpb 2.000 acc 50.00%"
    )
    with pytest.raises(ConfigError, match="unknown task"):
        tasks.check_task("regression")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """``sparsetrain train configs/gpt_char.yaml`` (RigL, tiny overrides) on the tiny corpus."""
    out = tmp_path_factory.mktemp("lm") / "run"
    settings = [*TINY, "sparsity.method=rigl", "sparsity.sparsity=0.5"]
    overrides = [arg for item in settings for arg in ("--set", item)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(
            ["-q", "train", "configs/gpt_char.yaml", *overrides, "--data-dir", str(corpus)]
            + ["--out", str(out)]
        )
    return code, stdout.getvalue(), out


def test_language_model_run_reports_bits_per_byte(trained):
    code, stdout, out = trained
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [16, 32, 48]
    for r in records:
        assert r["train_bpb"] == pytest.approx(r["train_loss"] / math.log(2))
        assert r["test_bpb"] == pytest.approx(r["test_loss"] / math.log(2))
        assert 0 <= r["test_acc"] <= 1
    assert records[-1]["test_bpb"] < 5  # uniform over 256 bytes is 8 bits
    assert records[-1]["test_loss"] < records[1]["test_loss"] < records[0]["test_loss"]
    headline = re.search(r"final validation loss: ([\d.]+) \(([\d.]+) bits per byte\)", stdout)
    assert headline and float(headline.group(2)) == pytest.approx(records[-1]["test_bpb"], abs=1e-3)


def test_language_model_report_counts_sparse_projections(trained, capsys):
    _, stdout, out = trained
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"] for row in report["sparsity"]["layers"]}
    assert "blocks.0.attn.q.weight" in rows and "blocks.1.mlp.proj.weight" in rows
    assert not {"tok_emb.weight", "pos_emb.weight", "head.weight"} & rows
    per_module = report["flops"]["per_module"]
    assert per_module["head"][0] == per_module["head"][1] > 0  # the tied head is dense
    assert per_module["blocks.0.mlp.fc"][1] < per_module["blocks.0.mlp.fc"][0]
    assert 0 < report["training_flops"] < report["training_flops_dense"]
    assert cli.main(["report", str(out / "final.pt"), "-o", str(out / "layers.png")]) == 0
    assert "blocks.0.attn.v.weight" in capsys.readouterr().out
    assert cli.main(["eval", str(out / "final.pt")]) == 0
    printed = capsys.readouterr().out
    trained_bpb = re.search(r"\(([\d.]+) bits per byte\)", stdout).group(1)
    assert f"({trained_bpb} bits per byte)" in printed


def test_model_and_dataset_of_different_tasks_are_refused(corpus, tmp_path):
    gpt_on_images = load_config(
        "configs/gpt_char.yaml", [*TINY, "data.name=synthetic", "data.options={}"]
    )
    with pytest.raises(ConfigError, match="'gpt' is a language_model model but dataset"):
        builders.build_model_for(gpt_on_images)
    mlp_on_text = load_config(
        "configs/gpt_char.yaml", [*TINY, "model.name=mlp", "model.options={}"]
    )
    with pytest.raises(ConfigError, match=r"list_models\('language_model'\)"):
        builders.build_model_for(mlp_on_text)


def test_interrupted_language_model_run_resumes_bit_identical(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "plot_training_curves", lambda records, path, **_: path)
    monkeypatch.setattr(outputs, "plot_layer_sparsity", lambda table, path, **_: path)
    settings = [*TINY, "sparsity.method=rigl", "sparsity.options={update_every: 8}"]

    def config(out):
        return load_config(
            "configs/gpt_char.yaml", [*settings, f"data.dir={corpus}", f"train.out={out}"]
        )

    straight = loop.train(config(tmp_path / "straight"))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(TrainingInterrupted):
        signal_at(patch, 21)  # SIGTERM mid-epoch 2, after the mask update at step 16
        loop.train(config(tmp_path / "resumed"))
    resumed = loop.train(resume=tmp_path / "resumed")
    a, b = straight.state, resumed.state
    assert b.step == a.step == 48
    assert_identical(a.model.state_dict(), b.model.state_dict(), "model")
    assert_identical(a.sparsifier.state_dict(), b.sparsifier.state_dict(), "sparsifier")
    assert_identical(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in straight.metrics]
    assert drop_time == [{k: v for k, v in r.items() if k != "time"} for r in resumed.metrics]
