"""The ``sparse-cpu`` format: Linear layers on MKL's CSR kernels, where that is measured faster.

``y = (W_csr @ x^T)^T`` with int32 indices is the fastest CPU call form measured for an
unstructured weight (``F.linear(x, W_csr)`` is ~6x slower, int64 indices ~1.5x slower; see
docs/performance.md). Whether CSR beats dense depends on density, layer shape, batch size and the
machine, so each layer is timed against its dense version at the export batch size and converted
only when it wins by ``min_speedup``. Convolutions stay dense: torch has no sparse convolution on
CPU, and im2col + CSR measured 0.10-0.16x of oneDNN's dense convolution.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.errors import ConfigError, ExportError
from sparsetrain.export.timing import compare
from sparsetrain.progress import progress

__all__ = ["LayerDecision", "SparseLinear", "load_sparse_cpu", "save_sparse_cpu", "to_sparse_cpu"]

log = logging.getLogger(__name__)

FORMAT_TAG = "sparsetrain.sparse-cpu"
VERSION = 1
_MKL_DTYPES = (torch.float32, torch.float64)
_CONV_REASON = "no sparse convolution kernel on CPU (im2col + CSR measured 0.10-0.16x of dense)"


@dataclass(frozen=True)
class LayerDecision:
    """Why one sparse layer runs dense or sparse in an export, with the timings behind it."""

    layer: str
    module: str
    density: float
    choice: str  # "sparse" or "dense"
    reason: str
    dense_us: float | None = None  # median microseconds per call, when measured
    sparse_us: float | None = None
    speedup: float | None = None  # median paired dense/sparse time ratio; > 1: sparse faster


class SparseLinear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` holding its weight in CSR form.

    The CSR parts are plain buffers (``weight_crow_indices``, ``weight_col_indices``,
    ``weight_values``) so the module deep-copies, moves and saves like any other; the CSR view
    over them is rebuilt per call, which costs ~2 us. Inference only: the values get no gradient.
    """

    def __init__(
        self,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_crow_indices", crow_indices.to(torch.int32))
        self.register_buffer("weight_col_indices", col_indices.to(torch.int32))
        self.register_buffer("weight_values", values)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """CSR copy of ``linear``'s weight (zeros dropped) and its bias."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = linear.weight.detach().to_sparse_csr()
        return cls(
            csr.crow_indices(),
            csr.col_indices(),
            csr.values().clone(),
            linear.in_features,
            linear.out_features,
            linear.bias,
        )

    def weight_csr(self) -> torch.Tensor:
        """The weight as a CSR tensor (a view over the buffers)."""
        return torch.sparse_csr_tensor(
            self.weight_crow_indices,
            self.weight_col_indices,
            self.weight_values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).T
        if self.bias is None:
            y = torch.mm(self.weight_csr(), flat)
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight_csr(), flat)
        return y.T.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.weight_values.numel() / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={density:.3f}"
        )


def _density(weight: torch.Tensor) -> float:
    return float(torch.count_nonzero(weight)) / max(1, weight.numel())


def _decide_linear(
    name: str, linear: nn.Linear, *, batch_size: int, min_speedup: float, rounds: int
) -> tuple[LayerDecision, SparseLinear | None]:
    density = _density(linear.weight)
    module = type(linear).__name__
    if linear.weight.dtype not in _MKL_DTYPES:
        reason = f"CSR kernels need float32/float64, weight is {linear.weight.dtype}"
        return LayerDecision(name, module, density, "dense", reason), None
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(batch_size, linear.in_features, dtype=linear.weight.dtype)
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    timing = compare(lambda: F.linear(x, weight, bias), lambda: sparse(x), rounds=rounds)
    speedup = timing.speedup
    choice = "sparse" if speedup >= min_speedup else "dense"
    reason = f"measured {speedup:.2f}x at batch {batch_size} (needs >= {min_speedup:g}x)"
    dense_us, sparse_us = timing.baseline_s * 1e6, timing.candidate_s * 1e6
    decision = LayerDecision(name, module, density, choice, reason, dense_us, sparse_us, speedup)
    return decision, sparse if choice == "sparse" else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` (the root itself when ``name`` is empty); return the root."""
    if not name:
        return module
    try:
        model.set_submodule(name, module, strict=True)
    except AttributeError as exc:
        raise ExportError(f"layer {name!r} does not exist in the given model") from exc
    return model


def to_sparse_cpu(
    model: nn.Module, *, batch_size: int = 64, min_speedup: float = 1.1, rounds: int = 5
) -> nn.Module:
    """Move ``model`` (already baked, modified in place) to CPU and swap in :class:`SparseLinear`
    wherever timing at ``batch_size`` shows it at least ``min_speedup`` times faster; returns the
    model (a new root only when the model itself is one Linear).

    ``batch_size`` is the number of input rows a layer sees per call (batch x tokens for a
    sequence model). Every layer with a sparse weight gets a :class:`LayerDecision` in
    ``model.export_decisions`` (also logged), measured or explained.
    """
    for key, value in (("batch_size", batch_size), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"sparse-cpu {key} must be a positive integer, got {value!r}")
    model.cpu()
    decisions: dict[str, LayerDecision] = {}
    for name, module in progress(list(model.named_modules()), "timing layers", unit="module"):
        if type(module) is nn.Linear:
            if _density(module.weight) >= 1.0:
                continue
            decision, sparse = _decide_linear(
                name, module, batch_size=batch_size, min_speedup=min_speedup, rounds=rounds
            )
            if sparse is not None:
                model = _replace(model, name, sparse)
        else:
            weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
            if not weights or min(_density(p) for p in weights) >= 1.0:
                continue
            density = min(_density(p) for p in weights)
            conv = isinstance(module, nn.modules.conv._ConvNd)
            reason = _CONV_REASON if conv else f"no sparse kernel for {type(module).__name__}"
            decision = LayerDecision(name, type(module).__name__, density, "dense", reason)
        decisions[name] = decision
        log.info(
            "%s (%s, density %.3f): %s, %s",
            name,
            decision.module,
            decision.density,
            decision.choice,
            decision.reason,
        )
    model.export_decisions = decisions
    return model


def save_sparse_cpu(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a :func:`to_sparse_cpu` model as its state_dict plus which layers are CSR; loads with
    ``weights_only=True`` through :func:`load_sparse_cpu`."""
    layers = {
        name: [m.in_features, m.out_features]
        for name, m in model.named_modules()
        if isinstance(m, SparseLinear)
    }
    decisions = [asdict(d) for d in getattr(model, "export_decisions", {}).values()]
    blob = {
        "format": FORMAT_TAG,
        "version": VERSION,
        "sparse_layers": layers,
        "decisions": decisions,
        "state_dict": model.state_dict(),
    }
    torch.save(blob, path)


def _check_fits(model: nn.Module, name: str, in_features: int, out_features: int) -> None:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ExportError(
            f"sparse-cpu file does not fit the given model: no layer {name!r}"
        ) from None
    shape = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
    if type(layer) is not nn.Linear or shape != (in_features, out_features):
        raise ExportError(
            f"sparse-cpu file does not fit the given model: {name!r} is {layer}, the file holds "
            f"a {in_features}->{out_features} Linear"
        )


def load_sparse_cpu(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a sparse-cpu file into ``model``, a freshly built instance of the plain model class
    (its Linear layers are replaced in place by the saved CSR ones); returns ``model``."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ExportError(f"cannot read sparse-cpu file {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_TAG:
        raise ExportError(f"{os.fspath(path)!r} is not a sparsetrain sparse-cpu file")
    if blob.get("version", 0) > VERSION:
        raise ExportError(f"sparse-cpu file version {blob['version']} is newer than {VERSION}")
    state = blob["state_dict"]
    for name, (in_features, out_features) in blob["sparse_layers"].items():
        _check_fits(model, name, in_features, out_features)
        prefix = f"{name}." if name else ""
        layer = SparseLinear(
            state[prefix + "weight_crow_indices"],
            state[prefix + "weight_col_indices"],
            state[prefix + "weight_values"],
            in_features,
            out_features,
            state.get(prefix + "bias"),
        )
        model = _replace(model, name, layer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"sparse-cpu file does not fit the given model: {exc}") from exc
    model.export_decisions = {d["layer"]: LayerDecision(**d) for d in blob["decisions"]}
    return model.cpu()
