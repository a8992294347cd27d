"""Model registry: build a network by name, e.g. ``build_model("resnet20", in_channels=3)``.

Importing this package registers the built-in models (``mlp``, ``mlp_4096``, ``lenet5``,
``small_cnn``, ``resnet20/32/56``, ``wrn``, ``wrn28_2``, and the language model ``gpt``);
``register_model`` adds your own.
"""

from sparsetrain.models import cnn, gpt, mlp, resnet  # noqa: F401  (registers the built-in models)
from sparsetrain.models.registry import build_model, list_models, model_task, register_model

__all__ = ["build_model", "list_models", "model_task", "register_model"]
