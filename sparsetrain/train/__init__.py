"""Config-driven training: ``train(load_config("run.yaml"))`` is what ``sparsetrain train`` runs."""

from sparsetrain.train.checkpoint import load_checkpoint, save_checkpoint
from sparsetrain.train.config import Config, config_from_dict, load_config, save_config
from sparsetrain.train.context import TrainContext
from sparsetrain.train.entry import train
from sparsetrain.train.epochs import evaluate, run_epochs
from sparsetrain.train.state import RunResult, TrainState

__all__ = [
    "Config",
    "RunResult",
    "TrainContext",
    "TrainState",
    "config_from_dict",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "run_epochs",
    "save_checkpoint",
    "save_config",
    "train",
]
