"""Layer selection on arbitrary modules."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.select import select_parameters


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.bn(self.pointwise(self.depthwise(x))).mean(dim=(2, 3)))


class WithOwnParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(10, 6))
        self.scale = nn.Parameter(torch.ones(6))
        self.embed = nn.Embedding(20, 10)

    def forward(self, idx):
        return self.embed(idx) @ self.proj * self.scale


def test_transformer_encoder_layer_selects_attention_and_ffn():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    names = list(select_parameters(layer))
    assert names == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


def test_gru_weight_matrices_are_sparse_biases_dense():
    gru = nn.GRU(8, 12, num_layers=2)
    names = set(select_parameters(gru))
    assert names == {"weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"}


def test_conv1d_and_depthwise_separable():
    conv1d = nn.Sequential(nn.Conv1d(3, 8, 5), nn.ReLU(), nn.Conv1d(8, 4, 3))
    assert list(select_parameters(conv1d)) == ["0.weight", "2.weight"]
    names = list(select_parameters(DepthwiseSeparable()))
    assert names == ["depthwise.weight", "pointwise.weight", "head.weight"]


def test_user_parameters_selected_embeddings_dense_by_default():
    model = WithOwnParameter()
    assert list(select_parameters(model)) == ["proj"]
    assert list(select_parameters(model, include_embeddings=True)) == ["proj", "embed.weight"]


def test_first_last_dense_and_globs():
    model = DepthwiseSeparable()
    assert list(select_parameters(model, dense_first=True, dense_last=True)) == ["pointwise.weight"]
    assert list(select_parameters(model, exclude=["head.*"])) == [
        "depthwise.weight",
        "pointwise.weight",
    ]
    assert list(select_parameters(model, include=["*wise.weight"])) == [
        "depthwise.weight",
        "pointwise.weight",
    ]


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_unknown_glob_is_an_error_naming_it(key):
    with pytest.raises(st.ConfigError, match="conv9"):
        select_parameters(DepthwiseSeparable(), **{key: ["conv9.weight"]})


@pytest.mark.parametrize(
    "model, x",
    [
        (
            nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True),
            torch.randn(2, 5, 16),
        ),
        (DepthwiseSeparable(), torch.randn(2, 8, 6, 6)),
        (nn.Sequential(nn.Conv1d(3, 8, 5), nn.ReLU(), nn.Conv1d(8, 4, 3)), torch.randn(2, 3, 12)),
    ],
)
def test_sparsify_trains_any_module_at_exact_sparsity(model, x):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = st.sparsify(model, opt, method="static", sparsity=0.75)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for name, mask in sp.masks.items():
        assert int(mask.sum()) == round(0.25 * mask.numel())
        assert torch.all(sp.params[name][~mask] == 0)


def test_gru_trains_sparse():
    torch.manual_seed(0)
    gru = nn.GRU(8, 12)
    opt = torch.optim.Adam(gru.parameters(), lr=1e-2)
    sp = st.sparsify(gru, opt, method="static", sparsity=0.5)
    for _ in range(3):
        opt.zero_grad()
        gru(torch.randn(4, 2, 8))[0].sum().backward()
        opt.step()
    assert all(torch.all(sp.params[n][~m] == 0) for n, m in sp.masks.items())
