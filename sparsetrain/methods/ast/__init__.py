"""AST: alternating sparse training of nested sub-networks (Yang et al., NeurIPS 2022).

One run trains K sub-networks of increasing sparsity that share one set of weights:

* :mod:`~sparsetrain.methods.ast.method`: the method (the schedule of sub-networks, mask updates,
  the sparsifier hooks, switching at inference);
* :mod:`~sparsetrain.methods.ast.subnet_masks`: the stack of K nested masks per tensor, built on
  the pure selections of :mod:`~sparsetrain.methods.ast.nested_masks`;
* :mod:`~sparsetrain.methods.ast.switchable_bn`: one BatchNorm per sub-network;
* :mod:`~sparsetrain.methods.ast.grad_correction`: the projection between consecutive
  sub-networks' gradients;
* :mod:`~sparsetrain.methods.ast.checkpoint`: one sub-network out of a checkpoint (``sparsetrain
  eval/export --subnet``).
"""

from sparsetrain.methods.ast.checkpoint import subnet_checkpoint, subnet_index
from sparsetrain.methods.ast.method import AST

__all__ = ["AST", "subnet_checkpoint", "subnet_index"]
