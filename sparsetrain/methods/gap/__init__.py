"""GaP: grow-and-prune over groups of layers (Ma et al., ICLR 2022).

* :mod:`~sparsetrain.methods.gap.method`: C-GaP, the registered method ``gap``: one process, the
  groups grown dense in turn, a phase machine on the sparsifier's hooks;
* :mod:`~sparsetrain.methods.gap.partitions`: how layers are split into groups (by count or
  globs), with each layer's BatchNorm and bias kept beside it;
* :mod:`~sparsetrain.methods.gap.parallel`: P-GaP, one worker per group (one process each under
  ``torchrun``, or one after another), merged and pruned back each round. It trains its own
  model copies, so it has its own driver; ``sparsetrain train`` reaches it through
  :mod:`sparsetrain.train.parallel_gap`.
"""

from sparsetrain.methods.gap.method import DEFAULT_GROUPS, FINETUNE, GaP

__all__ = ["DEFAULT_GROUPS", "FINETUNE", "GaP"]
