"""AC/DC's dense twin in a loop of your own: ``st.finetune_dense_twin``."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.errors import ConfigError, ExportError
from tests.conftest import TinyCNN

STEPS, PER_EPOCH = 60, 10  # final compressed phase: steps 51-60


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _user_run(momentum=0.9, steps=STEPS):
    """A plain loop with a per-step cosine scheduler; alongside it, a twin trained by hand.

    The hand-made twin is branched when the final phase begins (a copy of the model and the
    optimizer as they were before that compression) and steps on the same batches at the
    scheduler's learning rates: what the helper must reproduce afterwards.
    """
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    sp = st.sparsify(
        model, opt, method="acdc", sparsity=0.9, total_steps=STEPS, steps_per_epoch=PER_EPOCH
    )
    g = torch.Generator().manual_seed(1)
    final_batches, twin, twin_opt = [], None, None
    for t in range(steps):
        batch = (torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
        if twin is not None:
            final_batches.append(batch)
            twin_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
            twin_opt.zero_grad()
            _loss(twin, batch).backward()
            twin_opt.step()
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        sched.step()
        if t == 50:  # the last dense step is done: branch the twin by hand
            twin = TinyCNN()
            twin.load_state_dict(sp.method.snapshot["model"])
            twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum)
            twin_opt.load_state_dict(copy.deepcopy(sp.method.snapshot["optimizer"]))
    return sp, final_batches, twin


def test_the_helper_gives_the_twin_trained_alongside_on_the_same_lrs():
    sp, batches, by_hand = _user_run()
    assert len(sp.method.final_lrs) == 9 and len(batches) == 9
    lrs = [lrs[0] for lrs in sp.method.final_lrs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.1  # the cosine's tail, replayed
    twin = st.finetune_dense_twin(sp, _loss, batches)
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], value, rtol=0, atol=0)
    weights = [p for n, p in twin.named_parameters() if n in sp.params]
    nonzero = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert nonzero > 0.2  # dense: restored weights trained (the sparse model keeps 10%)
    assert sp.sparsity == pytest.approx(0.9, abs=1e-3)  # the sparse model is untouched


def test_export_returns_the_fine_tuned_twin_without_a_warning(caplog):
    sp, batches, _ = _user_run()
    snapshot = copy.deepcopy(sp.method.snapshot["model"])
    twin = st.finetune_dense_twin(sp, _loss, batches, max_grad_norm=1.0)
    with caplog.at_level(logging.WARNING):
        exported = sp.export(which="dense")
    assert "not been fine-tuned" not in caplog.text
    for name, value in twin.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value)
    moved = [
        n
        for n, v in snapshot.items()
        if v.is_floating_point() and not torch.equal(v, twin.state_dict()[n])
    ]
    assert moved  # fine-tuning changed the snapshot
    again = st.finetune_dense_twin(sp, _loss, batches)  # already done: the same twin
    assert all(torch.equal(again.state_dict()[n], v) for n, v in twin.state_dict().items())


def test_recorded_lrs_survive_a_state_dict_round_trip():
    sp, _, _ = _user_run()
    fresh_model = TinyCNN()
    fresh = st.sparsify(
        fresh_model,
        torch.optim.SGD(fresh_model.parameters(), lr=0.1),
        method="acdc",
        sparsity=0.9,
        total_steps=STEPS,
        steps_per_epoch=PER_EPOCH,
    )
    fresh.load_state_dict(copy.deepcopy(sp.state_dict()))
    assert fresh.method.final_lrs == sp.method.final_lrs


def test_bad_uses_are_clear_errors(caplog):
    sp, batches, _ = _user_run(steps=40)
    with pytest.raises(ExportError, match="step 51"):
        st.finetune_dense_twin(sp, _loss, batches)
    sp, batches, _ = _user_run(steps=55)
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match="ran out of batches"):
        st.finetune_dense_twin(sp, _loss, iter(batches[:2]))
    assert "4 of its 9 steps" in caplog.text
    model = TinyCNN()
    rigl = st.sparsify(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="rigl",
        sparsity=0.9,
        total_steps=10,
    )
    with pytest.raises(ConfigError, match="AC/DC run"):
        st.finetune_dense_twin(rigl, _loss, batches)
