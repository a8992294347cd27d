"""The compiled sparse-convolution kernels: built on first use, or None when they cannot be.

``csrc/sparse_conv.cpp`` ships inside the package and is compiled by
``torch.utils.cpp_extension.load`` the first time a sparse convolution runs (a few seconds; the
result is cached under the torch extensions directory, ``TORCH_EXTENSIONS_DIR``, and reused by
later processes until the source changes). It is a plain C library over raw pointers, called
through ctypes, so the build includes no torch headers. It is built with ``-O3 -march=native
-fopenmp``, and without those flags if the compiler rejects them (a serial, portable build).
When no build works (no compiler, no ninja) convolutions train on the masked dense kernels,
after one warning. ``SPARSETRAIN_NO_EXTENSION=1`` forces that fallback without building. A build
killed midway (Ctrl-C, an out-of-time job) does not block the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["DISABLE_ENV", "ConvKernels", "conv_kernels"]

log = logging.getLogger(__name__)

DISABLE_ENV = "SPARSETRAIN_NO_EXTENSION"
SOURCE = Path(__file__).parent / "csrc" / "sparse_conv.cpp"
# (extension name, compiler flags): the fast build first, then one any C++17 compiler takes.
BUILDS = (
    ("sparsetrain_conv", ["-O3", "-march=native", "-fopenmp", "-std=c++17"]),
    ("sparsetrain_conv_portable", ["-O3", "-std=c++17"]),
)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_P, _I, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# Argument types of each exported function (see csrc/sparse_conv.cpp).
_SIGNATURES = {
    "pack": [_P, _P, *[_I] * 13, _N],
    "unpack": [_P, _P, *[_I] * 13, _N],
    "gather": [_P, _P, _P, _P, _P, _P, *[_I] * 8, _N],
    "scatter": [_P, _P, _P, _P, _P, _P, *[_I] * 9, _N],
    "grad_weight": [_P, _P, _P, _P, _P, *[_I] * 12, _N],
}


class ConvKernels:
    """The loaded library: ``fn(name, dtype)`` is the kernel ``name`` for ``dtype``."""

    def __init__(self, library: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        self.tiles: dict[torch.dtype, int] = {}
        for dtype, suffix in _SUFFIX.items():
            tile = getattr(library, f"st_tile_{suffix}")
            tile.restype = ctypes.c_int64
            self.tiles[dtype] = int(tile())
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(library, f"st_{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self._fns[name, dtype] = fn

    def fn(self, name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
        return self._fns[name, dtype]


def conv_kernels() -> ConvKernels | None:
    """The kernels, built on the first call of the process; None when disabled or unbuildable."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    return _load()


@functools.cache
def _load() -> ConvKernels | None:
    failures = []
    for name, flags in BUILDS:
        try:
            path = _build(name, flags)
            kernels = ConvKernels(ctypes.CDLL(path), path)
        except Exception as error:  # noqa: BLE001 - any failure means: no extension
            failures.append(f"{name}: {type(error).__name__}: {str(error).strip()[-300:]}")
            continue
        log.info("sparse convolution kernels: %s (%s)", path, " ".join(flags))
        return kernels
    warnings.warn(
        "sparsetrain: the sparse convolution extension could not be built, so convolutions "
        "train on the masked dense kernels (" + "; ".join(failures) + ")",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _build(name: str, flags: list[str]) -> str:
    """Compile (or reuse the cached build of) the source; the path of the shared library."""
    from torch.utils import cpp_extension

    with _ninja_on_path(), _build_lock(name):
        return cpp_extension.load(
            name,
            [str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=[f for f in flags if f == "-fopenmp"],
            is_python_module=False,
            verbose=False,
        )


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """One build of ``name`` at a time across processes, on a lock the system drops when its
    holder dies. torch's own lock is a file that a killed build leaves behind and that every later
    build waits on forever; since each build here holds this lock, one found under it is stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    from torch.utils.cpp_extension import _get_build_directory

    directory = Path(_get_build_directory(name, verbose=False))
    with open(directory / "sparsetrain.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch builds with ninja; the pip package installs it next to this Python, which is not
    on PATH in a virtual environment that was not activated."""
    scripts = str(Path(sys.executable).parent)
    if shutil.which("ninja") is not None or shutil.which("ninja", path=scripts) is None:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([scripts, before]) if before else scripts
    try:
        yield
    finally:
        os.environ["PATH"] = before
