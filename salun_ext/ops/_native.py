"""Guarded load of the compiled kernels (salun_ext._C).

The C++/CUDA kernels register themselves with the dispatcher when the shared library loads. If it cannot load
(not built, built against another torch, broken toolkit), the reason is logged once and every op keeps working
on its plain-PyTorch reference kernel. SALUN_EXT_FORCE_REFERENCE=1 skips the load on purpose (it accepts only
"1", so a stray "0" or "false" never disables the kernels by accident).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os

import torch

LOG = logging.getLogger("salun_ext")
FORCE_REFERENCE_ENV = "SALUN_EXT_FORCE_REFERENCE"


@dataclasses.dataclass(frozen=True)
class NativeStatus:
    loaded: bool
    reason: str  # why it is not loaded; "" when loaded
    built_with_cuda: bool
    built_for_torch: str | None
    path: str | None


def _load() -> NativeStatus:
    force = os.environ.get(FORCE_REFERENCE_ENV, "")
    if force == "1":
        return NativeStatus(False, f"{FORCE_REFERENCE_ENV}=1", False, None, None)
    if force not in ("", "0"):
        LOG.warning("salun_ext: %s accepts only '1'; ignoring %r", FORCE_REFERENCE_ENV, force)
    try:
        build_info = importlib.import_module("salun_ext._build_info")
    except ImportError:
        return NativeStatus(False, "the native library was not built (pure-Python install)", False, None, None)
    built_for = getattr(build_info, "TORCH_VERSION", None)
    with_cuda = bool(getattr(build_info, "WITH_CUDA", False))
    if built_for != torch.__version__:
        return NativeStatus(
            False,
            f"built against torch {built_for} but torch {torch.__version__} is installed (C++ ABI); rebuild with "
            "`pip install --no-build-isolation -e .`",
            with_cuda,
            built_for,
            None,
        )
    try:
        module = importlib.import_module("salun_ext._C")
    except (ImportError, OSError) as exc:
        return NativeStatus(False, f"loading salun_ext._C failed: {exc}", with_cuda, built_for, None)
    return NativeStatus(True, "", with_cuda, built_for, getattr(module, "__file__", None))


STATUS = _load()
if not STATUS.loaded and os.environ.get(FORCE_REFERENCE_ENV) != "1":
    LOG.warning("salun_ext: compiled kernels unavailable, using the reference kernels (%s)", STATUS.reason)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `op` ("salun_ext::name") has a kernel registered for `dispatch_key` ("CPU", "CUDA", ...)."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))
