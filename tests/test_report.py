"""Sparsity tables, dense vs sparse FLOPs and plots of sparsetrain.report."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsetrain.errors import ConfigError, DataError, SparsetrainError
from sparsetrain.report import (
    FlopsReport,
    inference_flops,
    plot_layer_sparsity,
    plot_training_curves,
    sparsity_report,
    training_flops_per_step,
)
from sparsetrain.report.plots import _flops_per_row
from sparsetrain.report.summary import build_report
from tests.conftest import TinyCNN, tiny_mlp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def exact_mask(shape: tuple[int, ...], keep: int, seed: int = 0) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``keep`` ones at random places."""
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=g)[:keep]] = True
    return flat.view(shape)


def masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the masked-off weights in place, as the sparsifier does."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return model


def counter_total(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- FLOPs


def test_linear_dense_flops_are_two_in_out_per_layer():
    torch.manual_seed(0)
    report = inference_flops(tiny_mlp(), torch.randn(1, 1, 16, 16))
    assert report.per_module == {
        "1": (2 * 256 * 48, 2 * 256 * 48),
        "3": (2 * 48 * 32, 2 * 48 * 32),
        "5": (2 * 32 * 4, 2 * 32 * 4),
    }
    assert report.dense == report.sparse == 2 * (256 * 48 + 48 * 32 + 32 * 4)
    assert report.ratio == 1.0


def test_sparse_linear_flops_scale_exactly_with_density():
    torch.manual_seed(0)
    model = tiny_mlp()
    keep = {"1.weight": 1229, "3.weight": 153, "5.weight": 1}
    masks = {
        name: exact_mask(tuple(model.get_parameter(name).shape), k) for name, k in keep.items()
    }
    report = inference_flops(masked(model, masks), torch.randn(1, 1, 16, 16), masks)
    # Each product of a kept weight is one multiply and one add.
    assert report.per_module == {
        "1": (2 * 256 * 48, 2 * 1229),
        "3": (2 * 48 * 32, 2 * 153),
        "5": (2 * 32 * 4, 2 * 1),
    }
    assert report.sparse == 2 * sum(keep.values())
    assert report.ratio == pytest.approx(report.sparse / report.dense)


def test_conv_net_per_module_attribution_sums_to_counter_total(tiny_cnn):
    masks = {
        name: exact_mask(tuple(p.shape), p.numel() // (i + 2), seed=i)
        for i, (name, p) in enumerate(tiny_cnn.named_parameters())
        if p.dim() > 1
    }
    x = torch.randn(1, 1, 16, 16)
    report = inference_flops(masked(tiny_cnn, masks), x, masks)

    assert set(report.per_module) == {"conv1", "conv2", "fc1", "fc2"}
    assert report.dense == counter_total(TinyCNN(), x)
    assert sum(d for d, _ in report.per_module.values()) == report.dense
    assert sum(s for _, s in report.per_module.values()) == report.sparse
    for module, (dense, sparse) in report.per_module.items():
        mask = masks[f"{module}.weight"]
        assert sparse == pytest.approx(dense * mask.float().mean().item(), abs=1)
    assert report.sparse < report.dense


def test_channels_last_conv_weight_is_matched(tiny_cnn):
    model = tiny_cnn.to(memory_format=torch.channels_last)
    mask = exact_mask((16, 8, 3, 3), 288)
    report = inference_flops(model, torch.randn(1, 1, 16, 16), {"conv2.weight": mask})
    dense, sparse = report.per_module["conv2"]
    assert sparse * 4 == dense


def test_flop_count_restores_training_flags_and_fastpath(tiny_cnn):
    tiny_cnn.train()
    tiny_cnn.bn1.eval()
    inference_flops(tiny_cnn, torch.randn(1, 1, 16, 16))
    assert tiny_cnn.training and tiny_cnn.conv1.training and not tiny_cnn.bn1.training
    assert torch.backends.mha.get_fastpath_enabled()


def test_multihead_attention_in_proj_slices_and_out_proj():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    # Rows of the packed in_proj_weight: 0-7 project queries, 8-15 keys, 16-23 values.
    in_proj = torch.ones(24, 8, dtype=torch.bool)
    in_proj[8:16, :4] = False  # keys at density 1/2
    in_proj[16:24, 2:] = False  # values at density 1/4
    out_proj = exact_mask((8, 8), 32)
    masks = {"in_proj_weight": in_proj, "out_proj.weight": out_proj}
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)

    class Attend(nn.Module):
        def __init__(self, cross: bool) -> None:
            super().__init__()
            self.attn, self.cross = attn, cross

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            key, value = (k, v) if self.cross else (x, x)
            return self.attn(x, key, value, need_weights=False)[0]

    masks = {f"attn.{n}": m for n, m in masks.items()}
    dense_model = inference_flops(Attend(cross=True), q)
    report = inference_flops(Attend(cross=True), q, masks)
    # Projections of q (3 tokens), k and v (5 tokens each) and the output, then attention
    # (q @ k^T and weights @ v over 2 heads of 4 channels), which the CPU counts too.
    assert dense_model.dense == 384 + 640 + 640 + 384 + 2 * (2 * 3 * 5 * 8)
    assert report.dense == dense_model.dense
    # Key and value projections: 2 * 5 tokens * 8 * 8 each; output projection: 2 * 3 * 8 * 8.
    saved = 640 // 2 + 640 * 3 // 4 + 384 // 2
    assert report.dense - report.sparse == saved
    assert set(report.per_module) == {"attn"}

    self_attention = inference_flops(Attend(cross=False), q, masks)
    # Self-attention projects q, k and v of the 3 tokens through the whole in_proj at once.
    saved = 2 * 3 * (8 * 8 // 2 + 8 * 8 * 3 // 4) + 384 // 2
    assert self_attention.dense - self_attention.sparse == saved


class TiedHead(nn.Module):
    """A custom F.linear layer plus an output layer that reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = Projection()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.proj(self.emb(tokens)), self.emb.weight)


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def test_custom_functional_weight_and_tied_weight():
    torch.manual_seed(0)
    masks = {"proj.w": exact_mask((8, 8), 16), "emb.weight": exact_mask((10, 8), 40)}
    report = inference_flops(TiedHead(), torch.tensor([[1, 2, 3]]), masks)
    # 3 tokens: proj 2*3*8*8 at density 1/4; tied head 2*3*8*10 at density 1/2 in the root.
    assert report.per_module == {"proj": (384, 96), "": (480, 240)}


class ForwardMasked(nn.Module):
    """A layer that masks a copy of its weight in forward: no op reads the weight itself."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(mask.shape))
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask)


def test_weight_used_through_a_copy_falls_back_to_its_module():
    mask = exact_mask((6, 10), 15)
    model = nn.Sequential(ForwardMasked(mask), nn.Linear(6, 2))
    report = inference_flops(model, torch.randn(1, 10), {"0.weight": mask})
    assert report.per_module == {"0": (120, 30), "1": (24, 24)}


def test_flops_reject_batches_and_unknown_masks(tiny_cnn):
    with pytest.raises(ConfigError, match="batch of one"):
        inference_flops(tiny_cnn, torch.randn(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="conv9"):
        inference_flops(tiny_cnn, torch.randn(1, 1, 16, 16), {"conv9.weight": torch.ones(1)})
    with pytest.raises(ConfigError, match="shape"):
        inference_flops(tiny_cnn, torch.randn(1, 1, 16, 16), {"fc2.weight": torch.ones(4, 3)})


def test_training_flops_per_step_convention():
    assert training_flops_per_step(100, 100, 8) == 2400
    assert training_flops_per_step(100, 10, 8) == 240
    assert training_flops_per_step(100, 10, 8, dense_backward=True) == (10 + 10 + 100) * 8
    with pytest.raises(ConfigError):
        training_flops_per_step(100, 10, 0)


def test_flops_report_to_dict_is_json():
    report = FlopsReport(dense=10, sparse=4, per_module={"fc": (10, 4)})
    assert json.loads(json.dumps(report.to_dict())) == {
        "dense": 10,
        "sparse": 4,
        "ratio": 0.4,
        "per_module": {"fc": [10, 4]},
    }


# -------------------------------------------------------------------------- sparsity


def hand_masks() -> dict[str, torch.Tensor]:
    return {"1.weight": exact_mask((48, 256), 1229), "5.weight": exact_mask((4, 32), 13)}


def test_sparsity_report_totals_on_hand_built_masks():
    model = tiny_mlp()
    report = sparsity_report(model, hand_masks(), {"1.weight": 0.9})
    assert [row.name for row in report.rows] == ["1.weight", "5.weight"]
    first, last = report.rows
    assert (first.shape, first.numel, first.active, first.target) == ((48, 256), 12288, 1229, 0.9)
    assert first.actual == pytest.approx(1 - 1229 / 12288)
    assert (last.active, last.target, last.actual) == (13, None, pytest.approx(1 - 13 / 128))

    all_params = sum(p.numel() for p in model.parameters())
    assert (report.sparse_params, report.sparse_active) == (12288 + 128, 1229 + 13)
    assert report.total_params == all_params
    assert report.total_active == all_params - (12288 + 128) + (1229 + 13)
    assert report.sparsity == pytest.approx(1 - 1242 / 12416)
    assert report.overall_sparsity == pytest.approx(1 - report.total_active / all_params)


def test_sparsity_is_read_from_the_mask_not_the_weights():
    model = tiny_mlp()
    with torch.no_grad():
        model[1].weight.zero_()  # zero weights that the mask keeps
    assert sparsity_report(model, hand_masks()).rows[0].active == 1229


def test_sparsity_report_to_dict_and_format():
    report = sparsity_report(tiny_mlp(), hand_masks(), {"1.weight": 0.9, "5.weight": 0.9})
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["shape"] == [48, 256]
    assert data["sparse_active"] == 1242
    assert data["sparsity"] == pytest.approx(report.sparsity)

    text = report.format()
    lines = text.splitlines()
    assert "1.weight" in text and "5.weight" in text
    assert "90.00%" in text and f"{report.sparsity:.2%}" in text
    assert f"{report.overall_sparsity:.2%}" in text
    table = [line for line in lines if line.endswith("%") and "active," not in line]
    assert len({len(line) for line in table}) == 1, "columns are not aligned"


def test_sparsity_report_rejects_bad_input():
    model = tiny_mlp()
    with pytest.raises(ConfigError, match="9.weight"):
        sparsity_report(model, {"9.weight": torch.ones(1)})
    with pytest.raises(ConfigError, match="shape"):
        sparsity_report(model, {"1.weight": torch.ones(256, 48, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="3.weight"):
        sparsity_report(model, hand_masks(), {"3.weight": 0.5})

    tied = TiedHead()
    tied.head = nn.Linear(8, 10, bias=False)
    tied.head.weight = tied.emb.weight
    both = {"emb.weight": torch.ones(10, 8), "head.weight": torch.ones(10, 8)}
    with pytest.raises(ConfigError, match="tied"):
        sparsity_report(tied, both)


# ----------------------------------------------------------------------------- plots

RECORDS = [
    {"epoch": 1, "step": 4, "train_loss": 1.2, "test_acc": 0.5, "sparsity": 0.5, "lr": 0.1},
    {"epoch": 2, "step": 8, "train_loss": 0.8, "sparsity": 0.8, "lr": 0.1},
    {"epoch": 3, "step": 12, "train_loss": 0.6, "test_acc": 0.7, "sparsity": 0.9, "lr": 0.01},
]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


STEPS = [
    {
        "step": s,
        "epoch": 1 + s // 4,
        "loss": 2.0 / s,
        "lr": 0.1,
        "sparsity": 0.9 * (s % 3 == 0),
        "density": {"0.weight": 1 - 0.9 * (s % 3 == 0), "2.weight": 0.5},
    }
    for s in range(1, 13)
] + [
    {"step": s, "loss": 0.5, "lr": 0.01, "sparsity": 0.0, "density": {}, "phase": "dense_twin"}
    for s in (10, 11, 12)
]


def test_training_curves_from_epoch_records_alone(tmp_path):
    png_size(plot_training_curves(RECORDS, tmp_path / "epochs.png"))


def test_training_curves_with_step_records_add_the_per_layer_timeline(tmp_path):
    twin = {"epoch": 3, "step": 12, "train_loss": 0.5, "test_acc": 0.8, "phase": "dense_twin"}
    with_steps = plot_training_curves([*RECORDS, twin], tmp_path / "steps.png", steps=STEPS)
    plain = plot_training_curves(RECORDS, tmp_path / "plain.png")
    assert png_size(with_steps)[1] > png_size(plain)[1]  # the per-layer row
    ast = [{**r, "subnets": [0.5, 0.9]} for r in STEPS if "phase" not in r]
    assert png_size(plot_training_curves(RECORDS, tmp_path / "ast.png", steps=ast)) == png_size(
        plain
    )  # AST: a line per sub-network, no per-layer row (its records switch sub-network)


def test_training_curves_of_a_language_model_plot_bits_per_byte(tmp_path):
    lm = [{**r, "test_bpb": None if "test_acc" not in r else 3.0 - r["epoch"]} for r in RECORDS]
    png_size(plot_training_curves(lm, tmp_path / "lm.png"))


def test_training_curves_from_jsonl_skip_missing_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in RECORDS] + ["", json.dumps({"step": 13, "lr": 0.01})]
    path.write_text("\n".join(lines) + "\n")
    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps(r) + "\n" for r in STEPS))
    out = plot_training_curves(str(path), tmp_path / "plots" / "curves.png", steps=steps)
    assert out == tmp_path / "plots" / "curves.png"
    png_size(out)


def test_training_curves_report_unusable_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        plot_training_curves(path, tmp_path / "x.png")
    with pytest.raises(DataError, match="cannot read"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    with pytest.raises(DataError, match="no metric record"):
        plot_training_curves([{"step": 1, "lr": 0.1}], tmp_path / "x.png")


def test_layer_plot_shows_shares_of_parameters_and_of_flops(tmp_path):
    model = masked(tiny_mlp(), hand_masks())
    report = build_report(model, hand_masks(), {"1.weight": 0.9}, torch.randn(1, 256))
    per_row = _flops_per_row(report.sparsity, report.flops)
    unmasked = report.flops.per_module["3"]  # the layer without a mask: the last row's
    assert sum(d for d, _ in per_row) == report.flops.dense - unmasked[0]
    assert sum(s for _, s in per_row) == report.flops.sparse - unmasked[1]
    with_flops = plot_layer_sparsity(report, tmp_path / "layers.png")
    params_only = plot_layer_sparsity(report.sparsity, tmp_path / "params.png")
    assert png_size(with_flops)[0] > png_size(params_only)[0]
    with pytest.raises(SparsetrainError, match="no sparse layer"):
        plot_layer_sparsity(sparsity_report(tiny_mlp(), {}), tmp_path / "empty.png")
