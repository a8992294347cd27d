"""Layer selection on arbitrary modules."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.api import check_sparsify_arguments
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


def test_free_standing_matrices_and_embeddings_dense_by_default():
    model = WithOwnParameter()
    assert list(select_parameters(model)) == []
    assert list(select_parameters(model, include=["proj"])) == ["proj"]
    assert list(select_parameters(model, include_embeddings=True)) == ["embed.weight"]


class TinyViT(nn.Module):
    """Free-standing Transformer tensors beside real layers: a custom layer's own ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.relative_position_bias_table = nn.Parameter(torch.randn(9, 2))
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = CustomLinear(8, 24)
        self.head = nn.Linear(8, 3)


class CustomLinear(nn.Module):
    """Like Hugging Face's Conv1D: a layer that is not nn.Linear, its matrix named ``weight``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))


def test_positional_tables_and_class_tokens_stay_dense():
    names = list(select_parameters(TinyViT()))
    assert names == ["patch.weight", "qkv.weight", "head.weight"]


def test_a_head_tied_to_an_embedding_stays_dense():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)  # registered first: its name comes first
            self.embed = nn.Embedding(20, 8)
            self.head.weight = self.embed.weight
            self.mlp = nn.Linear(8, 8)

    assert list(select_parameters(TiedLM())) == ["mlp.weight"]


def test_layer_sparsity_globs_resolve_and_bad_ones_are_named():
    model = DepthwiseSeparable()
    sp = st.sparsify(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        sparsity=0.5,
        layer_sparsity={"head.*": 0.25, "pointwise.*": 0.75},
    )
    assert sp.targets == {"depthwise.weight": 0.5, "pointwise.weight": 0.75, "head.weight": 0.25}
    assert int(sp.mask("head.weight").sum()) == 48
    with pytest.raises(st.ConfigError, match="'fc.*' matches no sparse parameter"):
        st.sparsify(
            nn.Linear(4, 4),
            torch.optim.SGD([nn.Parameter(torch.ones(1))]),
            sparsity=0.5,
            layer_sparsity={"fc.*": 0.5},
        )
    with pytest.raises(st.ConfigError, match="layer_sparsity"):
        st.sparsify(
            nn.Linear(4, 4),
            torch.optim.SGD([nn.Parameter(torch.ones(1))]),
            sparsity=0.5,
            layer_sparsity={"weight": 1.5},
        )


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


def test_sparsify_takes_dense_as_the_config_name_of_exclude():
    model = DepthwiseSeparable()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.sparsify(model, opt, sparsity=0.5, dense=["head.*"])
    assert list(sp.masks) == ["depthwise.weight", "pointwise.weight"]
    sp.detach()
    with pytest.raises(st.ConfigError, match="not both"):
        st.sparsify(model, opt, sparsity=0.5, dense=["head.*"], exclude=["head.*"])
    with pytest.raises(st.ConfigError, match="not both"):
        check_sparsify_arguments(sparsity=0.5, dense=["a"], exclude=["b"])


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
