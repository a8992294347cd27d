"""P-GaP: GaP's parallel variant, one process per group under ``torchrun`` or all in one process.

Ma et al., ICLR 2022 (https://arxiv.org/abs/2106.09857); reference code
https://github.com/boone891214/GaP. Every layer but a dense stem conv (``dense_stem``, see
:mod:`sparsetrain.methods.gap.method`) starts sparse with a random mask at its ratio. Each round,
every worker starts from the same model, grows its own group of layers dense and trains
``step_length`` with a fresh optimizer and lr schedule that restarts with a linear warm-up
(``restart_warmup``), as every reference worker is a new training run. The workers' models are
merged (:mod:`sparsetrain.methods.gap.parallel.merge`: each group from its worker, the rest from
worker 0), every grouped layer is pruned back to its ratio by per-layer magnitude and the
BatchNorm statistics are recalibrated (:mod:`sparsetrain.methods.gap.parallel.rounds`). After the
rounds, the sparse model is fine-tuned (:mod:`sparsetrain.methods.gap.parallel.driver`).

Determinism: worker k of round r seeds its data order and the global RNG (dropout) from
(seed, r, k). The workers can therefore run one after another in one process
(``workers="sequential"``) or one per rank (``"distributed"``, on the process group of
:mod:`sparsetrain.collectives`), and both give the same merged model: bit for bit on CPU
with the same thread count, and on GPU as far as its kernels are deterministic. After every merge
and at the end, hashes of the masks and weights are compared across ranks.

Data: each worker trains on all the data in its own order, because the reference's workers are
full training runs. With ``shard=True``, worker k gets every kappa-th example starting from k.
Budget: ``total_steps`` counts one process's optimizer steps (wall-clock): ``rounds`` x
``step_length``, then the fine-tune. The rounds cost kappa times that in compute.

``sparsetrain train`` runs P-GaP through :func:`sparsetrain.train.parallel_gap.run_pgap`.
"""

from sparsetrain.methods.gap.parallel.driver import PGaPResult, pgap_train
from sparsetrain.methods.gap.parallel.merge import merge_workers

__all__ = ["PGaPResult", "merge_workers", "pgap_train"]
