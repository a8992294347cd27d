"""Config: defaults, file + --set overrides, and errors that name the offending key."""

from pathlib import Path

import pytest

from sparsetrain.errors import ConfigError
from sparsetrain.train.config import (
    Config,
    config_from_dict,
    load_config,
    parse_yaml,
    resolve,
    save_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_default_job():
    config = load_config()
    assert config == Config()
    assert (config.model.name, config.data.name) == ("small_cnn", "fashion_mnist")
    assert (config.train.batch_size, config.train.device) == (128, "cpu")
    assert (config.sparsity.method, config.sparsity.sparsity) == ("acdc", 0.9)
    assert config.optimizer.name == "sgd" and config.lr_schedule.name == "cosine"


def test_default_yaml_matches_the_built_in_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()


TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("compare"))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every training config loads (``compare*.yaml`` are grids for ``sparsetrain compare``)."""
    load_config(path)


def test_file_then_overrides(tmp_path):
    path = write(
        tmp_path,
        "optimizer: {lr: 0.2, nesterov: true}\ntrain:\n  epochs: 7\nsparsity: {method: ast}\n",
    )
    config = load_config(
        path,
        [
            "optimizer.lr=0.3",
            "train.batch_size=32",
            "sparsity.sparsity=[0.5, 0.75]",
            "sparsity.options.nested=true",
            "sparsity.dense=[fc2.*]",
            "data.name=synthetic",
            "data.options.num_samples=64",
            "train.out=runs/x",
        ],
    )
    assert config.optimizer.lr == 0.3 and config.optimizer.nesterov is True
    assert config.train.epochs == 7 and config.train.batch_size == 32
    assert config.sparsity.sparsity == [0.5, 0.75]
    assert config.sparsity.options == {"nested": True}
    assert config.sparsity.dense == ["fc2.*"]
    assert config.data.options == {"num_samples": 64}
    assert config.train.out == "runs/x"
    assert config.model == Config().model  # untouched sections keep their defaults


def test_int_accepted_for_float_but_not_bool_for_int():
    assert config_from_dict({"optimizer": {"lr": 1}}).optimizer.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict({"train": {"epochs": True}})
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=abc"])


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "'optimizer.lr_rate'" in message and str(path) in message
    assert "did you mean 'optimizer.lr'" in message


def test_unknown_section_in_file(tmp_path):
    with pytest.raises(ConfigError, match="'optimiser'.*did you mean 'optimizer'"):
        load_config(write(tmp_path, "optimiser: {lr: 0.1}\n"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epoch=3", "train.epoch"),
        ("sparsity.methd=rigl", "sparsity.methd"),
        ("modle.name=mlp", "modle.name"),
        ("optimizer.lr.x=1", "optimizer.lr.x"),
    ],
)
def test_unknown_key_in_override(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_override_needs_key_and_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["sparsity=0.5"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: small_cnn\n  width: [1.0\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}:" in str(error.value) and "line 3" in str(error.value)


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="'model'.*mapping"):
        load_config(write(tmp_path, "model: small_cnn\n"))


@pytest.mark.parametrize("value", ["1.5", "1.0", "-0.1", "[0.5, 1.0]", "[]"])
def test_bad_sparsity(value):
    with pytest.raises(ConfigError, match="sparsity"):
        load_config(None, [f"sparsity.sparsity={value}"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sparsity.method=rigel", "did you mean 'rigl'"),
        ("model.name=small_cn", "did you mean 'small_cnn'"),
        ("data.name=fashion", "data.name"),
        ("sparsity.distribution=erdos", "sparsity.distribution"),
        ("sparsity.options.presett=cifar", "sparsity.options.presett.*'preset'"),
        ("data.options.size=3", "size"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-1", "train.batch_size"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.name=adam", "did you mean 'adamw'"),
        ("lr_schedule.name=step", "milestones"),
        ("lr_schedule.warmup_epochs=5", "warmup_epochs"),
        ("train.device=gpu", "train.device"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_resolve_fills_defaults_it_left_open():
    config = resolve(load_config(None, ["train.seed=7", "train.name=demo"]))
    assert config.sparsity.seed == 7
    assert config.sparsity.distribution == "global"  # acdc's default
    assert Path(config.train.out) == Path("runs/acdc-small_cnn-demo")
    explicit = resolve(load_config(None, ["sparsity.seed=3", "train.out=elsewhere"]))
    assert explicit.sparsity.seed == 3 and explicit.train.out == "elsewhere"


def test_saved_config_reads_back_equal(tmp_path):
    config = resolve(
        load_config(
            None,
            [
                "sparsity.method=ast",
                "sparsity.sparsity=[0.5, 0.9]",
                "lr_schedule.name=step",
                "lr_schedule.milestones=[1, 2]",
                "train.epochs=3",
            ],
        )
    )
    assert load_config(save_config(config, tmp_path / "config.yaml")) == config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["sparsity.method=set", "sparsity.options.zeta=x"], "'sparsity.options.zeta'.*'set'.*'x'"),
        (["sparsity.method=rigl", "sparsity.options.update_every=abc"], "integer, got 'abc'"),
        (["sparsity.method=acdc", "sparsity.options.warmup=[1]"], "number or null, got \\[1\\]"),
        (["sparsity.method=static", "sparsity.sparsity=[0.5, 0.8]"], "'static' takes one"),
        (["train.seed=x"], "'train.seed' must be an integer, got 'x'"),
        (["sparsity.erk_power=x"], "'sparsity.erk_power' must be a finite number, got 'x'"),
        (["sparsity.seed=None"], "'sparsity.seed' must be an integer or null, got 'None'"),
    ],
)
def test_a_value_of_the_wrong_type_names_key_value_and_type(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "0.001", "+1e-3"])
def test_numbers_are_read_the_way_people_write_them(text, tmp_path):
    assert load_config(None, [f"optimizer.lr={text}"]).optimizer.lr == 0.001
    assert load_config(write(tmp_path, f"optimizer: {{lr: {text}}}\n")).optimizer.lr == 0.001
    assert load_config(None, ["train.save_every=1e3"]).train.save_every == 1000


def test_the_readme_config_reference_lists_every_key_with_its_default():
    readme = (CONFIGS.parent / "README.md").read_text()
    section = readme.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert parse_yaml(block) == Config().to_dict()
