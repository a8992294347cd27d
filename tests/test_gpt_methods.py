"""Every registered method on a tiny GPT, and N:M AC/DC and AST on its attention and MLP weights.

The registry-driven cases of ``tests/method_cases.py`` on a language model: sparse q/k/v/proj
and MLP weights, dense embeddings, norms and tied head, next-token targets over 32 positions.
"""

import pytest
import torch

import sparsetrain as st
from sparsetrain import tasks
from sparsetrain.models import build_model
from tests.method_cases import CASES, STEPS, run_case

METHODS = st.list_methods()
TINY = {"num_classes": 64, "image_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
PROJECTIONS = ["attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"]
SPARSE = sorted(f"blocks.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS)


def tiny_gpt() -> torch.nn.Module:
    return build_model("gpt", **TINY)


def token_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """8 sequences of a noisy counting pattern (learnable) and their next tokens."""
    start = torch.randint(0, 64, (8, 1), generator=g)
    stream = (start + torch.arange(33)) % 64
    noise = torch.rand(stream.shape, generator=g) < 0.1
    stream = torch.where(noise, torch.randint(0, 64, stream.shape, generator=g), stream)
    return stream[:, :-1], stream[:, 1:]


def run_gpt(name: str, optimizer_name: str = "adamw", **extra):
    return run_case(name, optimizer_name, model_fn=tiny_gpt, batch_fn=token_batch, **extra)


def watch_gradients(seen: list[str]):
    """``attach`` for ``run_case``: a step pre-hook after the sparsifier's, recording every sparse
    weight whose gradient, as the optimizer is about to use it, is not zero where it is masked."""

    def attach(opt: torch.optim.Optimizer, sp: st.Sparsifier) -> None:
        def check(optimizer, args, kwargs):
            for name, mask in sp.masks.items():
                grad = sp.params[name].grad
                if grad is not None and not torch.all(grad[~mask] == 0):
                    seen.append(f"step {sp.step + 1}: {name}")

        opt.register_step_pre_hook(check)

    return attach


@pytest.mark.parametrize("name", METHODS)
def test_every_method_keeps_exact_sparsity_and_masks_on_a_gpt(name):
    unmasked: list[str] = []
    model, opt, sp, _ = run_gpt(name, attach=watch_gradients(unmasked))
    assert model.head.weight is model.tok_emb.weight
    assert sorted(sp.params) == SPARSE  # projections and MLP weights, nothing else
    total = sum(p.numel() for p in sp.params.values())
    zeros = sum(int((~m).sum()) for m in sp.masks.values())
    assert zeros == pytest.approx(CASES[name]["final_sparsity"] * total, abs=len(sp.params))
    assert unmasked == []  # the optimizer only ever saw masked gradients
    for pname, mask in sp.masks.items():
        param = sp.params[pname]
        assert torch.all(param[~mask] == 0), f"{pname}: masked weights not zero"
        if CASES[name].get("kept_values"):
            continue
        for key, state in opt.state[param].items():
            if isinstance(state, torch.Tensor) and state.shape == param.shape:
                assert torch.all(state[~mask] == 0), f"{pname}: optimizer state {key} not masked"
    assert bool(model.tok_emb.weight.ne(0).all())  # the dense, tied embedding is untouched
    x, y = token_batch(torch.Generator().manual_seed(1))
    assert torch.isfinite(tasks.loss(model(x), y))


@pytest.mark.parametrize(
    "name",
    [name for name in METHODS if name != "dense"],  # dense: no masked weight, trivially true
)
def test_gradients_are_masked_where_they_are_produced(name):
    model, _, sp, _ = run_gpt(name)
    x, y = token_batch(torch.Generator().manual_seed(1))
    tasks.loss(model(x), y).backward()
    for pname, mask in sp.masks.items():
        assert torch.all(sp.params[pname].grad[~mask] == 0), f"{pname}: gradient not masked"


@pytest.mark.parametrize("name", METHODS)
def test_export_of_a_gpt_loads_strict_into_the_plain_model(name):
    model, _, sp, _ = run_gpt(name, steps=STEPS // 2 + 1)
    fresh = tiny_gpt()
    fresh.load_state_dict(sp.export().state_dict(), strict=True)
    assert fresh.head.weight is fresh.tok_emb.weight
    x, _ = token_batch(torch.Generator().manual_seed(2))
    model.eval()
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept weights per group of ``m`` consecutive inputs of a Linear weight."""
    return mask.reshape(-1, m).sum(dim=1)


def test_acdc_two_four_on_attention_and_mlp_projections():
    _, _, sp, _ = run_gpt("acdc", sparsity=0.5, nm=(2, 4))
    assert sp.method.phases.at(STEPS - 1).kind == "final_compressed"
    assert len(sp.masks) == 12
    for name, mask in sp.masks.items():
        assert bool((_groups(mask, 4) == 2).all()), name
        assert torch.all(sp.params[name][~mask] == 0), name


def test_ast_nm_subnetworks_on_attention_and_mlp_projections():
    nm = [(2, 4), (1, 4)]
    _, _, sp, _ = run_gpt("ast", sparsity=[0.5, 0.75], nm=nm)
    assert sp.method.ramp_done == [True, True]
    for i, (n, m) in enumerate(nm):
        masks = sp.method.subnet_masks(i)
        assert len(masks) == 12
        for name, mask in masks.items():
            assert bool((_groups(mask, m) == n).all()), (i, name)
    inner, outer = sp.method.subnet_masks(1), sp.method.subnet_masks(0)
    assert all(bool((inner[k] <= outer[k]).all()) for k in inner)  # nested
