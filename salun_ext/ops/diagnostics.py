"""Environment diagnostics: `python -m salun_ext env`."""

from __future__ import annotations

import platform
from typing import TextIO

import torch

from salun_ext.ops import _native, _schemas

DISPATCH_KEYS = ("CPU", "CUDA")


def env_report() -> dict:
    status = _native.STATUS
    ops = {}
    for op in _schemas.op_names():
        ops[op] = {key: _native.has_kernel(op, key) for key in DISPATCH_KEYS}
        ops[op]["reference"] = _native.has_kernel(op, "CompositeExplicitAutograd")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "native_loaded": status.loaded,
        "native_reason": status.reason,
        "native_built_with_cuda": status.built_with_cuda,
        "native_built_for_torch": status.built_for_torch,
        "native_path": status.path,
        "ops": ops,
    }


def print_env(out: TextIO) -> None:
    report = env_report()
    print(f"python        {report['python']}", file=out)
    print(f"torch         {report['torch']} (CUDA {report['torch_cuda']})", file=out)
    devices = ", ".join(report["devices"]) or "none"
    print(f"cuda devices  {devices}", file=out)
    if report["native_loaded"]:
        cuda = "with CUDA kernels" if report["native_built_with_cuda"] else "CPU kernels only"
        print(f"native        loaded, {cuda} ({report['native_path']})", file=out)
    else:
        print(f"native        not loaded: {report['native_reason']}", file=out)
    print("ops           compiled kernels per device (reference = plain-PyTorch fallback)", file=out)
    for op, kernels in report["ops"].items():
        have = [k for k in DISPATCH_KEYS if kernels[k]]
        ref = "yes" if kernels["reference"] else "no"
        print(f"  {op:<32} compiled: {', '.join(have) or 'none':<10} reference: {ref}", file=out)
