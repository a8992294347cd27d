"""The command line: a tiny train/eval/report round trip, and one clean line per user error."""

import contextlib
import io
import re
import subprocess
import sys

import pytest

from sparsetrain import cli

TINY = [
    "--set",
    "data.name=synthetic",
    "data.options.noise=1.0",
    "data.options.num_samples=512",
    "model.name=mlp",
    "model.width=0.5",
    "sparsity.method=static",
    "sparsity.sparsity=0.5",
    "optimizer.lr=0.2",
    "train.epochs=1",
    "train.batch_size=64",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["-q", "train", *TINY, "--out", str(out)])
    return code, stdout.getvalue(), out


def test_train_prints_accuracy_report_and_paths(trained):
    code, stdout, out = trained
    assert code == 0
    accuracy = re.search(r"final test accuracy: ([\d.]+)%", stdout)
    assert accuracy and float(accuracy.group(1)) > 50
    assert "fc1.weight" in stdout and "inference FLOPs" in stdout and "training FLOPs" in stdout
    assert str(out / "final.pt") in stdout and str(out / "curves.png") in stdout


def test_eval_reproduces_the_training_accuracy(trained, capsys):
    _, stdout, out = trained
    assert cli.main(["eval", str(out / "final.pt")]) == 0
    printed = capsys.readouterr().out
    trained_acc = re.search(r"final test accuracy: ([\d.]+%)", stdout).group(1)
    assert f"test accuracy: {trained_acc}" in printed
    assert "sparsity: 50.00%" in printed


def test_report_prints_table_and_writes_plot(trained, capsys, tmp_path):
    _, _, out = trained
    png = tmp_path / "layers.png"
    assert cli.main(["report", str(out / "final.pt"), "-o", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "fc1.weight" in printed and "50.00%" in printed and "training FLOPs" in printed
    assert png.stat().st_size > 0


def test_methods_lists_each_method_with_its_options(capsys):
    from sparsetrain.methods import list_methods

    assert cli.main(["methods"]) == 0
    printed = capsys.readouterr().out
    for name in list_methods():
        assert re.search(rf"^{name}\s", printed, re.MULTILINE)
    assert "sparse_init=False" in printed


def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: [small_cnn\n")
    return [str(path)]


def corrupt_checkpoint(tmp_path):
    path = tmp_path / "final.pt"
    path.write_bytes(b"sparsetrain-checkpoint {}\n")
    return ["eval", str(path)]


SYNTHETIC = ["train", "--set", "data.name=synthetic", "model.name=mlp"]
BAD = {
    "unknown method": ["train", "--set", "sparsity.method=rigl2"],
    "unknown model": ["train", "--set", "model.name=resnet21"],
    "unknown option": ["train", "--set", "sparsity.options.zeta=0.3"],
    "unknown key": ["train", "--set", "optimizer.lr_rate=0.1"],
    "sparsity 1.5": ["train", "--set", "sparsity.sparsity=1.5"],
    # on synthetic data, so that without these checks the run would start and fail inside
    "option of the wrong type": [*SYNTHETIC, "sparsity.method=set", "sparsity.options.zeta=x"],
    "int option not an int": [
        *SYNTHETIC,
        "sparsity.method=rigl",
        "sparsity.options.update_every=a",
    ],
    "sparsity list, one network": [*SYNTHETIC, "sparsity.method=static", "sparsity.sparsity=[0.5]"],
    "overwrite and resume": ["train", "--resume", "runs/x", "--overwrite"],
    "missing data dir": ["train", "--data-dir", "/nonexistent/fashion-mnist"],
    "missing config": ["train", "/nonexistent/run.yaml"],
    "missing checkpoint": ["eval", "/nonexistent/final.pt"],
}


@pytest.mark.parametrize(
    "argv",
    [*BAD.values(), bad_yaml, corrupt_checkpoint],
    ids=[*BAD, "bad yaml", "corrupt checkpoint"],
)
def test_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run directory, if one were wrongly created, lands here
    if callable(argv):
        argv = argv(tmp_path)
        argv = argv if argv[0] == "eval" else ["train", *argv]
    assert cli.main(["-q", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsetrain: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "runs").exists()


def test_module_entry_point_reports_errors_cleanly():
    done = subprocess.run(
        [sys.executable, "-m", "sparsetrain", "train", "--set", "sparsity.sparsity=1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "sparsetrain: error: sparsity.sparsity must lie in [0, 1), got 1.5"
    ]
