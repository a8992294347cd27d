"""The GPT language model: shapes, causality, the tied head and which weights are sparse."""

import pytest
import torch

from sparsetrain.errors import ConfigError
from sparsetrain.models import build_model, list_models, model_task
from sparsetrain.models.gpt import GPT, GPTConfig
from sparsetrain.select import select_parameters
from sparsetrain.tasks import CLASSIFICATION, LANGUAGE_MODEL

TINY = {"num_classes": 256, "image_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return build_model("gpt", **{**TINY, **overrides})


def test_registered_as_the_language_model() -> None:
    assert list_models(LANGUAGE_MODEL) == ["gpt"]
    assert model_task("gpt") == LANGUAGE_MODEL and model_task("mlp") == CLASSIFICATION
    assert "gpt" not in list_models(CLASSIFICATION)


def test_forward_gives_next_token_logits() -> None:
    model = tiny_gpt()
    idx = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, 32, 256) and torch.isfinite(logits).all()
    assert model(idx[:, :5]).shape == (3, 5, 256)  # shorter than the context is fine
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_a_tokens_logits_do_not_depend_on_later_tokens() -> None:
    model = tiny_gpt().eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (2, 32), generator=g)
    for t in (0, 7, 30):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 256, (2, 31 - t), generator=g)
        before, after = model(idx), model(changed)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])
    earlier = idx.clone()
    earlier[:, 3] = (earlier[:, 3] + 1) % 256  # an earlier token does change later logits
    assert not torch.allclose(model(earlier)[:, 4:], model(idx)[:, 4:])


def test_head_is_the_token_embedding() -> None:
    model = tiny_gpt()
    assert model.head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "head.weight" not in names
    state = model.state_dict()
    assert torch.equal(state["head.weight"], state["tok_emb.weight"])
    fresh = tiny_gpt()
    fresh.load_state_dict(state, strict=True)
    assert fresh.head.weight is fresh.tok_emb.weight


def test_projections_and_mlp_are_sparse_embeddings_norms_and_head_dense() -> None:
    sparse = set(select_parameters(tiny_gpt()))
    per_block = ["attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"]
    assert sparse == {f"blocks.{i}.{m}.weight" for i in range(2) for m in per_block}


def test_width_scales_the_head_size_and_options_are_checked() -> None:
    assert tiny_gpt(width=0.5).config.n_embd == 16  # 2 heads of 8
    assert tiny_gpt(n_head=4, n_embd=64, width=0.3).config.n_embd == 4 * 5  # heads kept
    with pytest.raises(ConfigError, match="multiple of n_head"):
        tiny_gpt(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="n_layer must be a positive integer"):
        tiny_gpt(n_layer=0)
    with pytest.raises(ConfigError, match="in_channels 1"):
        tiny_gpt(in_channels=3)
    with pytest.raises(ConfigError, match="n_embd must be a positive integer"):
        GPT(GPTConfig(n_embd=0))
