"""Adapters that put :func:`sparsetrain.sparsify` inside other people's training loops.

* :mod:`sparsetrain.integrations.hf`: ``SparsityCallback`` for the Hugging Face ``Trainer``
  (``pip install sparsetrain[hf]``);
* :mod:`sparsetrain.integrations.lightning`: ``SparsityCallback`` for Lightning
  (``pip install sparsetrain[lightning]``).

Each is a thin adapter over the public API: it finds the optimizer that really steps, the run's
length and where checkpoints go, and carries the sparsifier's state through the framework's own
checkpoints. The engine does the sparse training. Nothing here is imported by ``sparsetrain``
itself, so the frameworks stay optional.
"""
