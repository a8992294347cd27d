"""sparsetrain: sparse training from scratch for any ``torch.nn.Module``.

import sparsetrain as st
sp = st.sparsify(model, optimizer, method="rigl", sparsity=0.9, total_steps=T)
...  # the usual training loop
sp.report(); plain = sp.export()
"""

from sparsetrain.api import sparsify
from sparsetrain.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    SparsetrainError,
)
from sparsetrain.masks import Sparsifier
from sparsetrain.methods import Method, list_methods, register_method
from sparsetrain.twin import finetune_dense_twin

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "Method",
    "Sparsifier",
    "SparsetrainError",
    "__version__",
    "finetune_dense_twin",
    "list_methods",
    "register_method",
    "sparsify",
]
