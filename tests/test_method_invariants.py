"""Invariants every registered method must keep; parametrized over the registry."""

import copy
from typing import Any

import pytest
import torch

import sparsetrain as st
from tests.conftest import TinyCNN
from tests.method_cases import CASES, STEPS, STEPS_PER_EPOCH, run_case

METHODS = st.list_methods()


def test_every_method_has_a_case():
    assert set(METHODS) <= set(CASES), (
        f"add a case to tests/method_cases.py for {set(METHODS) - set(CASES)}"
    )


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("name", METHODS)
def test_masked_weights_and_state_are_zero(name, optimizer_name):
    model, opt, sp, _ = run_case(name, optimizer_name)
    for pname, mask in sp.masks.items():
        param = sp.params[pname]
        assert torch.all(param[~mask] == 0), f"{pname}: masked weights not zero"
        if CASES[name].get("kept_values"):
            continue
        for key, state in opt.state[param].items():
            if isinstance(state, torch.Tensor) and state.shape == param.shape:
                assert torch.all(state[~mask] == 0), f"{pname}: optimizer state {key} not masked"


@pytest.mark.parametrize("name", METHODS)
def test_final_sparsity_is_exact(name):
    _, _, sp, _ = run_case(name, "sgd")
    expected = CASES[name]["final_sparsity"]
    if expected is None:
        pytest.skip("method has no single final sparsity")
    total = sum(p.numel() for p in sp.params.values())
    zeros = sum(int((~m).sum()) for m in sp.masks.values())
    assert zeros == pytest.approx(expected * total, abs=len(sp.params))


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_restores_masks(name):
    model, opt, sp, _ = run_case(name, "sgd", steps=STEPS // 2 + 1)
    state = copy.deepcopy(sp.state_dict())
    fresh_model = TinyCNN()
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9)
    case = CASES[name]
    fresh = st.sparsify(
        fresh_model,
        fresh_opt,
        method=name,
        sparsity=case["sparsity"],
        total_steps=STEPS,
        steps_per_epoch=STEPS_PER_EPOCH,
        seed=123,
        **case["options"],
    )
    fresh.load_state_dict(state)  # masks first, then the weights: init masks zeroed other weights
    fresh_model.load_state_dict(model.state_dict())
    assert fresh.step == sp.step
    for pname, mask in sp.masks.items():
        assert torch.equal(fresh.masks[pname], mask)
        assert torch.equal(fresh.params[pname], sp.params[pname])


@pytest.mark.parametrize("name", METHODS)
def test_export_loads_strict_into_plain_model(name):
    model, _, sp, _ = run_case(name, "sgd", steps=STEPS // 2 + 1)
    plain = sp.export()
    fresh = TinyCNN()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_every_option_declares_its_type(name):
    from sparsetrain.methods import get_method, option_types

    untyped = [k for k, hint in option_types(get_method(name)).items() if hint is Any]
    assert not untyped, f"{name}: annotate the options {untyped} in __init__"


@pytest.mark.parametrize("name", METHODS)
def test_an_option_of_the_wrong_type_is_a_config_error_naming_it(name):
    """One mechanism for every method: the value fits none of the declared types."""
    from sparsetrain.methods import get_method, method_options

    case = CASES[name]
    for option in method_options(get_method(name)):
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        options = {**case["options"], option: {"bad": 1}}
        with pytest.raises(st.ConfigError, match=rf"'{option}' of method '{name}' must be .*got"):
            st.sparsify(
                model,
                opt,
                method=name,
                sparsity=case["sparsity"],
                total_steps=STEPS,
                steps_per_epoch=STEPS_PER_EPOCH,
                **options,
            )
