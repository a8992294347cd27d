"""SparsityCallback under the Hugging Face Trainer: tiny random GPT-2 and BERT, CPU, a few steps."""

import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

import sparsetrain as st
from sparsetrain.export import load_compressed
from sparsetrain.integrations.hf import COMPRESSED_FILE, STATE_FILE, SparsityCallback
from sparsetrain.train.checkpoint import load_checkpoint

VOCAB = 61


class TokenData(torch.utils.data.Dataset):
    """Random token ids; ``classes`` > 0 adds a label per sequence (for BERT), else LM labels."""

    def __init__(self, n: int = 40, length: int = 12, classes: int = 0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g) if classes else self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i], "labels": self.labels[i]}
        if self.labels is not self.ids:
            item["attention_mask"] = torch.ones_like(self.ids[i])
        return item


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


MODELS = {"gpt2": (gpt2, 0), "bert": (bert, 2)}


def make_trainer(out, model_name="gpt2", callbacks=(), data=None, **overrides):
    build, classes = MODELS[model_name]
    settings = dict(
        output_dir=str(out),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=4,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return Trainer(
        model=build(),
        args=TrainingArguments(**settings),
        train_dataset=data or TokenData(classes=classes),
        callbacks=list(callbacks),
    )


def assert_enforced(sp, sparsity=0.8):
    """Every sparse weight is zero wherever its mask is off, at the sparsity asked for."""
    for name, mask in sp.masks.items():
        assert not sp.params[name].detach()[~mask].any(), name
    assert abs(sp.sparsity - sparsity) < 0.01


METHODS = {
    "static": dict(method="static", sparsity=0.8),
    "rigl": dict(method="rigl", sparsity=0.8, update_every=3),
    "acdc": dict(
        method="acdc",
        sparsity=0.8,
        unit="steps",
        warmup=2,
        compressed=2,
        decompressed=2,
        last_dense=2,
        final_compressed=4,
    ),
    "ast": dict(method="ast", sparsity=[0.5, 0.8], update_every=2),
}


@pytest.mark.parametrize("model_name", ["gpt2", "bert"])
@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_trains_sparse(tmp_path, model_name, method):
    callback = SparsityCallback(**METHODS[method])
    trainer = make_trainer(tmp_path, model_name, [callback])
    trainer.train()
    sp = callback.sparsifier
    # The optimizer the Trainer built and stepped (under Accelerate's wrapper) is the one guarded.
    assert sp.optimizer is trainer.optimizer.optimizer
    assert sp.step == trainer.state.global_step == 12
    assert sp.method.total_steps == 12
    assert sp.method.steps_per_epoch == 10  # 40 examples / batch 4
    assert_enforced(sp, 0.5 if method == "ast" else 0.8)  # AST: the denser sub-network active
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3
    report = sp.report()
    assert report.flops is not None and report.flops.sparse < report.flops.dense  # keyword inputs
    if method == "ast":
        sp.use_subnet(1)
        assert_enforced(sp, 0.8)
    if method == "acdc":
        dense = sp.export(which="dense")  # the pair's dense model
        weight = next(n for n in sp.masks if "mlp" in n or "intermediate" in n)
        assert (dict(dense.named_parameters())[weight] != 0).float().mean() > 0.9


class StopAt(TrainerCallback):
    """Interrupts training after optimizer step ``step`` (as a crash after a checkpoint would)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def final_state(trainer, callback):
    sp = callback.sparsifier
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return sp.masks, weights, sp.step, sp.state_dict()["method_state"]


@pytest.mark.parametrize(
    "model_name, options",
    [
        ("gpt2", dict(method="rigl", sparsity=0.8, update_every=2)),
        ("gpt2", dict(method="ast", sparsity=[0.5, 0.8], update_every=2)),
        # BERT's nn.Linear layers on CSR kernels, the optimizer stepping only kept weights
        ("bert", dict(method="rigl", sparsity=0.8, update_every=2, kernels="sparse")),
    ],
    ids=["rigl", "ast", "rigl-sparse-kernels"],
)
def test_resume_ends_like_an_uninterrupted_run(tmp_path, model_name, options):
    def run(out, *extra, resume=None):
        callback = SparsityCallback(**options)
        trainer = make_trainer(
            out, model_name, [callback, *extra], save_strategy="steps", save_steps=5
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    whole = final_state(*run(tmp_path / "whole"))
    first, _ = run(tmp_path / "cut", StopAt(5))
    assert first.state.global_step == 5
    assert (tmp_path / "cut" / "checkpoint-5" / STATE_FILE).is_file()
    trainer, callback = run(tmp_path / "cut", resume=True)
    resumed = final_state(trainer, callback)
    assert resumed[2] == whole[2] == 12
    for name, mask in whole[0].items():
        assert torch.equal(mask, resumed[0][name]), name
    for name, weight in whole[1].items():
        assert torch.equal(weight, resumed[1][name]), name


class RequestJitCheckpoint(TrainerCallback):
    """Asks the Trainer's JIT checkpointing (its SIGTERM path) for a checkpoint after ``step``:
    the Trainer then saves without calling any callback's ``on_save``."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            jit = next(
                c
                for c in self.trainer.callback_handler.callbacks
                if getattr(c, "jit_manager", None)
            )
            jit.jit_manager.is_checkpoint_requested = True


def test_resume_from_a_jit_checkpoint(tmp_path):
    options = dict(method="rigl", sparsity=0.8, update_every=2)

    def trainer_for(out):
        callback = SparsityCallback(**options)
        trainer = make_trainer(out, callbacks=[callback], enable_jit_checkpoint=True)
        return trainer, callback

    whole = final_state(*_trained(trainer_for(tmp_path / "whole")))
    trainer, _ = trainer_for(tmp_path / "cut")
    trainer.add_callback(RequestJitCheckpoint(trainer, 4))
    trainer.train()
    assert trainer.state.global_step == 5  # the step under way when the request came finishes
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-4"]
    trainer, callback = trainer_for(tmp_path / "cut")
    trainer.train(resume_from_checkpoint=True)
    resumed = final_state(trainer, callback)
    for name, mask in whole[0].items():
        assert torch.equal(mask, resumed[0][name]), name
    for name, weight in whole[1].items():
        assert torch.equal(weight, resumed[1][name]), name


def _trained(pair):
    pair[0].train()
    return pair


def test_every_checkpoint_holds_the_verified_state(tmp_path, monkeypatch):
    # The state is on disk before the Trainer writes trainer_state.json, the checkpoint's last file.
    original = TrainerState.save_to_json

    def save_to_json(self, path):
        assert (Path(path).parent / STATE_FILE).is_file()
        return original(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    callback = SparsityCallback(method="rigl", sparsity=0.8, update_every=3, export_compressed=True)
    trainer = make_trainer(
        tmp_path, callbacks=[callback], save_strategy="steps", save_steps=4, save_total_limit=2
    )
    trainer.train()
    folders = sorted(tmp_path.glob("checkpoint-*"))
    assert [f.name for f in folders] == ["checkpoint-12", "checkpoint-8"]
    for folder in folders:
        state = load_checkpoint(folder / STATE_FILE)  # verified against its SHA-256
        step = int(folder.name.split("-")[1])
        assert state["global_step"] == state["sparsifier"]["step"] == step
        assert (folder / "optimizer.pt").is_file() and (folder / COMPRESSED_FILE).is_file()
    # save_model writes masked weights; the compressed export beside it is lossless.
    trainer.save_model(str(tmp_path / "final"))
    saved = GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    loaded = load_compressed(tmp_path / COMPRESSED_FILE)
    for name, mask in callback.sparsifier.masks.items():
        weight = dict(saved.named_parameters())[name]
        assert not weight[~mask].any() and weight[mask].ne(0).float().mean() > 0.99
        assert torch.equal(loaded[name], weight.detach())


def test_checkpoint_elsewhere_is_named_with_resume_from(tmp_path):
    options = dict(method="rigl", sparsity=0.8, update_every=2)
    trainer = make_trainer(
        tmp_path / "run",
        callbacks=[SparsityCallback(**options), StopAt(6)],
        save_strategy="steps",
        save_steps=6,
    )
    trainer.train()
    moved = tmp_path / "moved"
    (tmp_path / "run" / "checkpoint-6").rename(moved)
    with pytest.raises(st.CheckpointError, match=r"resume_from=\.\.\."):
        make_trainer(tmp_path / "run", callbacks=[SparsityCallback(**options)]).train(str(moved))
    callback = SparsityCallback(resume_from=moved, **options)
    make_trainer(tmp_path / "run", callbacks=[callback]).train(str(moved))
    assert callback.sparsifier.step == 12
    assert_enforced(callback.sparsifier)


def test_accumulation_clipping_bf16(tmp_path):
    seen = []

    class GradsAtStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            sp = callback.sparsifier
            seen.append(all(not sp.params[n].grad[~m].any() for n, m in sp.masks.items()))

    callback = SparsityCallback(method="rigl", sparsity=0.8, update_every=2)
    # 40 examples, batch 4: 10 micro-batches per epoch, 3 per step -> 4 steps (the last of one).
    trainer = make_trainer(
        tmp_path,
        callbacks=[callback, GradsAtStep()],
        max_steps=-1,
        num_train_epochs=2,
        gradient_accumulation_steps=3,
        max_grad_norm=0.05,
        bf16=True,
    )
    dtypes = set()
    layer = trainer.model.transformer.h[0].mlp.c_fc
    layer.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    trainer.train()
    assert dtypes == {torch.bfloat16}  # autocast was on
    sp = callback.sparsifier
    assert trainer.state.max_steps == sp.method.total_steps == 8
    assert sp.method.steps_per_epoch == 4
    assert sp.step == trainer.state.global_step == 8
    assert sp.backward_passes == 20  # every micro-batch counted
    assert len(seen) == 8 and all(seen)  # clipping saw (and the step applied) masked gradients
    assert_enforced(sp)
    assert trainer.state.log_history[0]["grad_norm"] > 0.05  # clipping was active


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="rigl2", sparsity=0.9), "unknown method 'rigl2'"),
        (dict(method="rigl", sparsity=0.9, updte_every=10), "unknown option 'updte_every'"),
        (dict(method="rigl", sparsity=0.9, update_every="often"), "update_every"),
        (dict(method="static", sparsity=1.5), r"sparsity must be in \[0, 1\)"),
        (dict(method="static", sparsity=0.9, model=None), "'model' is not an argument"),
        (
            dict(method="static", sparsity=0.9, layer_sparsity={"*.c_fc.*": 1.5}),
            r"layer_sparsity\['\*\.c_fc\.\*'\] must be in \[0, 1\)",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(options, message):
    with pytest.raises(st.ConfigError, match=message):
        SparsityCallback(**options)


def test_checkpoint_without_sparsifier_state(tmp_path, caplog):
    dense = make_trainer(tmp_path, save_strategy="steps", save_steps=6, max_steps=6)
    dense.train()
    with pytest.raises(st.CheckpointError, match="checkpoint-6 holds no sparsifier state"):
        make_trainer(tmp_path, callbacks=[SparsityCallback(method="rigl", sparsity=0.8)]).train(
            resume_from_checkpoint=True
        )
    callback = SparsityCallback(method="rigl", sparsity=0.8, update_every=2, strict=False)
    with caplog.at_level(logging.WARNING, logger="sparsetrain"):
        make_trainer(tmp_path, callbacks=[callback]).train(resume_from_checkpoint=True)
    assert "holds no sparsifier state" in caplog.text
    sp = callback.sparsifier
    assert sp.step == 6 and sp.method.total_steps == 6  # the remaining steps
    assert_enforced(sp)


def test_state_of_another_run_is_refused(tmp_path):
    for out, seed in (("a", 0), ("b", 1)):
        callback = SparsityCallback(method="static", sparsity=0.8, seed=seed)
        make_trainer(
            tmp_path / out, callbacks=[callback], save_strategy="steps", save_steps=6, max_steps=6
        ).train()
    other = tmp_path / "b" / "checkpoint-6" / STATE_FILE
    other.replace(tmp_path / "a" / "checkpoint-6" / STATE_FILE)
    trainer = make_trainer(
        tmp_path / "a", callbacks=[SparsityCallback(method="static", sparsity=0.8)]
    )
    with pytest.raises(st.CheckpointError, match="do not fit the loaded weights"):
        trainer.train(resume_from_checkpoint=True)
    path = tmp_path / "a" / "checkpoint-6" / STATE_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(st.CheckpointError, match="truncated or corrupt"):
        trainer.train(resume_from_checkpoint=True)


def test_reporters_get_the_sparsity(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = SparsityCallback(method="static", sparsity=0.8)
    make_trainer(tmp_path, callbacks=[callback], report_to=["tensorboard"]).train()
    events = EventAccumulator(str(next(tmp_path.glob("runs/*"))))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/sparsity/masks" in tags and "train/flops/inference_ratio" in tags
    layer = "train/sparsity/weights/transformer.h.0.mlp.c_fc.weight"
    assert [round(e.value, 4) for e in events.Scalars(layer)] == [0.8] * 4  # 3 logs + the final


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "sparsetrain.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[hf\]'"):
        importlib.import_module("sparsetrain.integrations.hf")


def test_package_does_not_import_the_integrations():
    root = Path(st.__file__).parent
    text = (root / "__init__.py").read_text()
    assert "integrations" not in text
