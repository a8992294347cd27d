"""Export formats: each round trip reproduces the masked model, and misfit masks are refused."""

import io
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError, ExportError
from sparsetrain.export import (
    SparseLinear,
    bake,
    check_two_four,
    export_model,
    load_compressed,
    load_sparse_cpu,
    save_compressed,
    synthesize_input,
    verify_export,
)
from sparsetrain.export.timing import compare
from tests.conftest import TinyCNN, tiny_mlp

TINY_RUN = [  # one quick epoch on a small synthetic set, to get a real checkpoint
    "--set",
    "data.name=synthetic",
    "data.options.num_samples=256",
    "model.name=mlp",
    "model.width=0.5",
    "sparsity.method=static",
    "sparsity.sparsity=0.8",
    "train.epochs=1",
    "train.batch_size=64",
]


def _sparse(model: nn.Module, sparsity: float = 0.9) -> st.Sparsifier:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return st.sparsify(model, opt, method="static", sparsity=sparsity, seed=0)


def _mlp(sizes=(256, 128, 64, 10)) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _file_size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


# ---------------------------------------------------------------------------- dense / compressed
def test_dense_loads_strict_into_plain_model_and_leaves_original_alone():
    model = _mlp()
    sp = _sparse(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = export_model(model, sp.masks, "dense")
    plain = _mlp()
    plain.load_state_dict(exported.state_dict(), strict=True)
    for name, mask in sp.masks.items():
        assert not plain.state_dict()[name][~mask].any()
    x = torch.randn(5, 256)
    torch.testing.assert_close(_outputs(plain, x), _outputs(model, x), rtol=0, atol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n])


def test_compressed_round_trip_is_bit_exact_and_small(tmp_path):
    model = _mlp((784, 300, 100, 10))
    sp = _sparse(model, 0.9)
    path = tmp_path / "model.stc"
    size = save_compressed(model, sp.masks, path)
    dense_size = _file_size(bake(model, sp.masks).state_dict())
    assert size == path.stat().st_size
    assert size <= 0.15 * dense_size, f"{size} bytes vs dense {dense_size}"
    state = load_compressed(path)
    baked = bake(model, sp.masks).state_dict()
    assert list(state) == list(baked)
    for name, tensor in baked.items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(state[name], tensor), name
    plain = _mlp((784, 300, 100, 10))
    plain.load_state_dict(state, strict=True)
    x = torch.randn(4, 784)
    torch.testing.assert_close(_outputs(plain, x), _outputs(model, x), rtol=0, atol=0)


def test_compressed_keeps_buffers_and_dense_tensors(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    sp = _sparse(model, 0.8)
    model.bn1.running_mean.uniform_()
    exported = export_model(model, sp.masks, "compressed", path=tmp_path / "cnn.stc")
    state = load_compressed(tmp_path / "cnn.stc")
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(state["bn1.running_mean"], model.bn1.running_mean)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(_outputs(exported, x), _outputs(model, x), rtol=0, atol=0)


def test_compressed_needs_path_and_rejects_foreign_files(tmp_path):
    model = _mlp()
    with pytest.raises(ConfigError, match="path"):
        export_model(model, None, "compressed")
    other = tmp_path / "plain.pt"
    torch.save(model.state_dict(), other)
    with pytest.raises(ExportError, match="not a sparsetrain compressed file"):
        load_compressed(other)


# ------------------------------------------------------------------------------- sparse-cpu
def test_sparse_linear_matches_linear_for_any_leading_dims():
    torch.manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(12, 7, bias=bias)
        with torch.no_grad():
            linear.weight.mul_(torch.rand_like(linear.weight) > 0.7)
        sparse = SparseLinear.from_linear(linear)
        for shape in ((5, 12), (2, 3, 12), (12,)):
            x = torch.randn(shape)
            torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-6)
        assert sparse.weight_values.numel() == int((linear.weight != 0).sum())
        assert sparse.weight_crow_indices.dtype == torch.int32


def test_sparse_cpu_forced_sparse_reproduces_outputs_and_reports_every_layer():
    torch.manual_seed(0)
    model = TinyCNN()
    sp = _sparse(model, 0.9)
    x = torch.randn(6, 1, 16, 16)
    exported = export_model(
        model, sp.masks, "sparse-cpu", example_input=x, batch_size=4, min_speedup=0.0, rounds=1
    )
    assert isinstance(exported.fc1, SparseLinear) and isinstance(exported.fc2, SparseLinear)
    assert isinstance(exported.conv1, nn.Conv2d)
    decisions = exported.export_decisions
    assert set(decisions) == {"conv1", "conv2", "fc1", "fc2"}
    assert decisions["fc1"].choice == "sparse" and decisions["fc1"].dense_us > 0
    assert decisions["fc1"].speedup > 0 and "measured" in decisions["fc1"].reason
    assert decisions["conv1"].choice == "dense" and "convolution" in decisions["conv1"].reason
    assert decisions["fc1"].density == pytest.approx(0.1, abs=0.01)
    torch.testing.assert_close(_outputs(exported, x), _outputs(model, x), rtol=1e-4, atol=1e-5)


def test_sparse_cpu_keeps_layers_dense_when_sparse_does_not_win():
    model = _mlp()
    sp = _sparse(model, 0.9)
    exported = export_model(model, sp.masks, "sparse-cpu", min_speedup=float("inf"), rounds=1)
    assert not any(isinstance(m, SparseLinear) for m in exported.modules())
    decisions = exported.export_decisions
    assert [d.choice for d in decisions.values()] == ["dense"] * 3
    assert all(d.sparse_us > 0 and d.dense_us > 0 for d in decisions.values())


def test_sparse_cpu_skips_dense_layers():
    model = _mlp()
    sp = _sparse(model, 0.9)
    masks = {n: m for n, m in sp.masks.items() if not n.startswith("4.")}
    model = _mlp()  # same seed: the same weights, with the last layer not yet masked
    exported = export_model(model, masks, "sparse-cpu", min_speedup=0.0, rounds=1)
    assert isinstance(exported[4], nn.Linear) and "4" not in exported.export_decisions


def test_sparse_cpu_file_round_trip(tmp_path):
    model = _mlp()
    sp = _sparse(model, 0.9)
    path = tmp_path / "mlp.sparse"
    exported = export_model(model, sp.masks, "sparse-cpu", path=path, min_speedup=0.0, rounds=1)
    loaded = load_sparse_cpu(_mlp(), path)
    assert isinstance(loaded[0], SparseLinear)
    assert loaded.export_decisions == exported.export_decisions
    x = torch.randn(3, 256)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(exported, x), rtol=0, atol=0)
    with pytest.raises(ExportError, match="does not fit"):
        load_sparse_cpu(_mlp((256, 128, 64, 3)), path)


def test_sparsifier_export_formats():
    model = tiny_mlp()
    sp = _sparse(model, 0.9)
    model(torch.randn(2, 1, 16, 16))  # the sparsifier captures the input shape
    plain = sp.export()
    assert set(plain.state_dict()) == set(tiny_mlp().state_dict())
    fast = sp.export(format="sparse-cpu", min_speedup=0.0, rounds=1)
    assert isinstance(fast[1], SparseLinear)
    with pytest.raises(ConfigError, match="no option"):
        sp.export(format="dense", batch_size=3)


# --------------------------------------------------------------------------- semi-structured
def test_check_two_four():
    score = torch.randn(8, 16)
    check_two_four("w", mask_ops.nm_mask(score, 2, 4))
    check_two_four("conv", mask_ops.nm_mask(torch.randn(4, 8, 3, 3), 2, 4))
    with pytest.raises(ExportError, match="not 2:4"):
        check_two_four("w", mask_ops.nm_mask(score, 3, 4))
    with pytest.raises(ExportError, match="multiple of 4"):
        check_two_four("w", torch.ones(8, 6, dtype=torch.bool))


def test_semi_structured_refuses_unstructured_masks():
    model = _mlp((64, 64, 32))
    sp = _sparse(model, 0.9)
    with pytest.raises(ExportError, match="0.weight: mask is not 2:4"):
        export_model(model, sp.masks, "semi-structured")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_semi_structured_refuses_cpu():
    model = _mlp((64, 64, 32))
    masks = {
        n: mask_ops.nm_mask(p.detach().abs(), 2, 4)
        for n, p in model.named_parameters()
        if p.dim() == 2
    }
    with pytest.raises(ExportError, match="CUDA"):
        export_model(model, masks, "semi-structured")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need CUDA")
def test_semi_structured_on_cuda_matches_masked_model():
    model = _mlp((128, 128, 64))
    masks = {
        n: mask_ops.nm_mask(p.detach().abs(), 2, 4)
        for n, p in model.named_parameters()
        if p.dim() == 2
    }
    exported = export_model(model, masks, "semi-structured")
    assert exported.export_decisions["0"].choice == "sparse"


# ---------------------------------------------------------------------------------- checking
def test_verify_rejects_a_wrong_export():
    model = _mlp()
    broken = _mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] += 1.0
    x = synthesize_input(model)
    assert verify_export(model, _mlp(), x) == 0.0
    with pytest.raises(ExportError, match="does not reproduce"):
        verify_export(model, broken, x)


def test_bad_requests_are_refused_with_a_message():
    model = _mlp()
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(model, None, "onnx")
    with pytest.raises(ConfigError, match="batch_size"):
        export_model(model, None, "compressed", batch_size=3)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        export_model(model, None, "sparse-cpu", batch_size=0)
    with pytest.raises(ExportError, match="shape"):
        export_model(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)}, "dense")
    with pytest.raises(ExportError, match="names no parameter"):
        export_model(model, {"nope.weight": torch.ones(3, 3, dtype=torch.bool)}, "dense")
    with pytest.raises(ExportError, match="example_input"):
        export_model(TinyCNN(), None, "sparse-cpu")


def test_synthesized_input_follows_the_captured_shape():
    model = TinyCNN()
    x = synthesize_input(model, like=torch.zeros(1, 1, 16, 16))
    assert x.shape == (8, 1, 16, 16) and x.std() > 0.5
    tokens = synthesize_input(model, like=torch.tensor([[1, 2, 3]]))
    assert tokens.shape == (8, 3) and torch.equal(tokens[5], torch.tensor([1, 2, 3]))


def test_compare_ranks_a_slower_callable():
    # Sleeps, not matmuls: the ranking must hold even when other jobs load the CPU.
    slow = compare(lambda: time.sleep(0.004), lambda: time.sleep(0.0005), rounds=3)
    assert slow.speedup > 2.0 and slow.best_speedup > 2.0
    assert slow.baseline_s > slow.candidate_s > 0


def test_sparse_linear_equals_functional_linear_on_csr_call_form():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(4, 32)
    expected = F.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-6)


def test_cli_export_writes_files_that_load_back(tmp_path, capsys):
    from sparsetrain import cli
    from sparsetrain.train.checkpoint import load_checkpoint

    assert cli.main(["-q", "train", *TINY_RUN, "--out", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "final.pt"
    _, _, model = cli._load_run(str(ckpt))
    masks = load_checkpoint(ckpt)["sparsifier"]["masks"]
    x = torch.randn(4, model.fc1.in_features)  # the MLP flattens its input
    expected = _outputs(bake(model, masks), x)

    assert (
        cli.main(["-q", "export", str(ckpt), "--format", "compressed", "-o", str(tmp_path / "c")])
        == 0
    )
    model.load_state_dict(load_compressed(tmp_path / "c"), strict=True)
    torch.testing.assert_close(_outputs(model, x), expected, rtol=0, atol=0)

    out = tmp_path / "s"
    argv = [
        "-q",
        "export",
        str(ckpt),
        "--format",
        "sparse-cpu",
        "--batch-size",
        "8",
        "-o",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert "sparse layers on CSR kernels" in capsys.readouterr().out
    loaded = load_sparse_cpu(cli._load_run(str(ckpt))[2], out)
    assert set(loaded.export_decisions) == {"fc1", "fc2", "fc3"}
    torch.testing.assert_close(_outputs(loaded, x), expected, rtol=1e-4, atol=1e-5)


def test_cli_export_semi_structured_checks_2_4_and_needs_cuda(tmp_path, capsys):
    from sparsetrain import cli

    assert cli.main(["-q", "train", *TINY_RUN, "--out", str(tmp_path / "u")]) == 0
    out = tmp_path / "w.pt"
    argv = ["-q", "export", "--format", "semi-structured", "-o", str(out)]
    assert cli.main([*argv[:2], str(tmp_path / "u" / "final.pt"), *argv[2:]]) == 2
    assert "mask is not 2:4" in capsys.readouterr().err
    nm = [
        "model.width=1",
        "sparsity.method=acdc",
        "sparsity.sparsity=0.5",
        "sparsity.options.nm=[2, 4]",
    ]
    assert cli.main(["-q", "train", *TINY_RUN, *nm, "--out", str(tmp_path / "nm")]) == 0
    code = cli.main([*argv[:2], str(tmp_path / "nm" / "final.pt"), *argv[2:]])
    if torch.cuda.is_available():
        assert code == 0 and "2:4 kernels" in capsys.readouterr().out and out.is_file()
    else:
        assert code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
        assert not out.exists()
