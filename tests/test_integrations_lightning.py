"""SparsityCallback under Lightning: a tiny MLP module, CPU, a few epochs."""

import importlib
import logging
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import sparsetrain as st
from sparsetrain.integrations.lightning import SparsityCallback


class Module(pl.LightningModule):
    """A small classifier (``optimizer="two"``: two optimizers, which the callback refuses)."""

    def __init__(self, optimizer="sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
        )
        self.optimizer = optimizer
        self.automatic_optimization = optimizer != "two"  # Lightning's rule for two optimizers

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "two":
            return [
                torch.optim.SGD(self.parameters(), lr=0.1),
                torch.optim.SGD(self.parameters(), lr=0.1),
            ]
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def make_trainer(tmp_path, callbacks, **overrides):
    settings = dict(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    settings.update(overrides)
    return pl.Trainer(callbacks=list(callbacks), **settings)


def assert_enforced(sp, sparsity=0.8):
    for name, mask in sp.masks.items():
        assert not sp.params[name].detach()[~mask].any(), name
    assert abs(sp.sparsity - sparsity) < 0.01


@pytest.mark.parametrize(
    "options",
    [dict(method="static", sparsity=0.8), dict(method="rigl", sparsity=0.8, update_every=3)],
    ids=["static", "rigl"],
)
def test_lightning_trains_sparse(tmp_path, options):
    callback = SparsityCallback(**options)
    module = Module()
    trainer = make_trainer(
        tmp_path,
        [callback],
        accumulate_grad_batches=3,
        gradient_clip_val=0.05,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=4,
    )
    trainer.fit(module, loader())
    sp = callback.sparsifier
    assert sp.optimizer is trainer.optimizers[0]
    # 10 batches per epoch, 3 per step: 4 steps an epoch (the last of one batch), 16 in all.
    assert sp.method.total_steps == trainer.global_step == sp.step == 16
    assert sp.method.steps_per_epoch == 4
    assert sp.backward_passes == 40
    assert_enforced(sp)
    if options["method"] == "rigl":
        # The update steps ranked dense gradients: the closure ran before the sparsifier's hook.
        assert sp.method.dense_gradient_steps > 0
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "sparsity/masks" in metrics and "flops/inference_ratio" in metrics


def test_closure_runs_before_the_sparsifier_hook(tmp_path):
    """RigL's mask update must see this step's gradient, as in a loop of one's own."""
    masks = {}
    for mode in ("lightning", "loop"):
        module = Module()
        if mode == "lightning":
            callback = SparsityCallback(method="rigl", sparsity=0.8, update_every=2)
            make_trainer(tmp_path, [callback], max_epochs=1).fit(module, loader())
            masks[mode] = callback.sparsifier.masks
            continue
        opt = module.configure_optimizers()
        sp = st.sparsify(
            module,
            opt,
            method="rigl",
            sparsity=0.8,
            update_every=2,
            total_steps=10,
            steps_per_epoch=10,
        )
        for x, y in loader():
            opt.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            opt.step()
        masks[mode] = sp.masks
    for name, mask in masks["loop"].items():
        assert torch.equal(mask, masks["lightning"][name]), name


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_ends_like_an_uninterrupted_run(tmp_path):
    def run(*extra, ckpt_path=None):
        callback = SparsityCallback(method="rigl", sparsity=0.8, update_every=3)
        module = Module()
        trainer = make_trainer(tmp_path, [callback, *extra])
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
        weights = {n: p.detach().clone() for n, p in module.named_parameters()}
        return callback.sparsifier, weights

    whole_sp, whole = run()
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    cut_sp, _ = run(StopAfterEpoch(1), saver)
    assert cut_sp.step == 20
    sp, weights = run(ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=20.ckpt"))
    assert sp.step == whole_sp.step == 40
    for name, mask in whole_sp.masks.items():
        assert torch.equal(mask, sp.masks[name]), name
    for name, weight in whole.items():
        assert torch.equal(weight, weights[name]), name


def test_checkpoint_of_a_finished_run(tmp_path):
    # Lightning trains no step from it (no on_train_start); the sparsifier is restored all the same.
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    options = dict(method="rigl", sparsity=0.8, update_every=3)
    first = SparsityCallback(**options)
    make_trainer(tmp_path, [first, saver], max_epochs=1).fit(Module(), loader())
    callback = SparsityCallback(**options)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(Module(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    sp = callback.sparsifier
    assert sp is not None and sp.step == first.sparsifier.step == trainer.global_step == 10
    for name, mask in first.sparsifier.masks.items():
        assert torch.equal(mask, sp.masks[name]), name
    assert_enforced(sp)


def test_checkpoint_without_sparsifier_state(tmp_path, caplog):
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, [saver], max_epochs=1).fit(Module(), loader())
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    with pytest.raises(st.CheckpointError, match="holds no sparsifier state"):
        make_trainer(tmp_path, [SparsityCallback(method="static", sparsity=0.8)]).fit(
            Module(), loader(), ckpt_path=ckpt
        )
    callback = SparsityCallback(method="rigl", sparsity=0.8, update_every=3, strict=False)
    with caplog.at_level(logging.WARNING, logger="sparsetrain"):
        make_trainer(tmp_path, [callback]).fit(Module(), loader(), ckpt_path=ckpt)
    assert "holds no sparsifier state" in caplog.text
    assert callback.sparsifier.method.total_steps == 30 and callback.sparsifier.step == 30
    assert_enforced(callback.sparsifier)


def test_bad_input(tmp_path):
    with pytest.raises(st.ConfigError, match="unknown option 'updte_every'"):
        SparsityCallback(method="rigl", sparsity=0.9, updte_every=3)
    with pytest.raises(st.ConfigError, match="sparsifies one optimizer"):
        make_trainer(tmp_path, [SparsityCallback(method="static", sparsity=0.8)]).fit(
            Module("two"), loader()
        )


def test_submodule_and_keyword_flops(tmp_path):
    callback = SparsityCallback(method="static", sparsity=0.8, module="model")
    module = Module()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(module, loader())
    sp = callback.sparsifier
    assert set(sp.masks) == {"0.weight", "2.weight", "4.weight"}
    assert sp.report().flops.ratio < 0.5


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "sparsetrain.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[lightning\]'"):
        importlib.import_module("sparsetrain.integrations.lightning")
