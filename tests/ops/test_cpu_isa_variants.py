"""The CPU step loops are compiled once per instruction set (baseline, AVX2, AVX-512; picked at run time), and the
window select classifies keys with AVX2 where the CPU has it: every variant gives the same bits. Each variant runs
in its own process (SALUN_EXT_CPU_ISA is read once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salun_ext import ops

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch
from salun_ext import ops
torch.manual_seed(0)
out = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for density in (0.0, 0.001, 0.3, 1.0):
        sizes = [1, 31, 33, 100, 1000, 40000]  # partial words, several work items
        ps = [torch.randn(n).to(dtype) for n in sizes]
        gs = [torch.randn(n).to(dtype) for n in sizes]
        bufs = [torch.randn(n).to(dtype) for n in sizes]
        ms = [torch.randn(n).to(dtype) for n in sizes]
        vs = [torch.rand(n).to(dtype) for n in sizes]
        words = [ops.pack_bits(torch.rand(n) < density) for n in sizes]
        ops.masked_sgd_(ps, gs, bufs, words, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True)
        steps = [torch.tensor(3.0) for _ in sizes]
        ops.masked_adam_(ps, gs, ms, vs, [], steps, words, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
        out[f"{dtype}-{density}"] = [t.clone() for t in ps + bufs + ms + vs]
        # compact state (AVX-512 stages fp32 entries with compress / expand; the others walk the set bits)
        counts = [int(ops.unpack_bits(w, n).sum()) for w, n in zip(words, sizes)]
        cb = [torch.randn(c).to(dtype) for c in counts]
        cm, cv = [torch.randn(c).to(dtype) for c in counts], [torch.rand(c).to(dtype) for c in counts]
        cx = [torch.rand(c).to(dtype) for c in counts]
        ops.masked_sgd_compact_(ps, gs, cb, words, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
        ops.masked_adam_compact_(ps, gs, cm, cv, cx, steps, words, lr=1e-2, weight_decay=0.1, amsgrad=True)
        out[f"compact-{dtype}-{density}"] = [t.clone() for t in ps + cb + cm + cv + cx]
# the window select classifies keys with AVX2 compares where the CPU has them: NaN, Inf, denormals, -0, partial words
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    xs = [torch.randn(n).to(dtype) for n in (1, 31, 33, 100, 1000, 40000)]
    xs[3][::7], xs[4][::5], xs[5][::3] = float("nan"), float("-inf"), -0.0
    xs[5][1::3] = torch.finfo(dtype).tiny / 4
    for lo, hi in ((0x3E000000, 0x3F800000), (0, 0), (0x00000001, 0x7FFFFFFF)):
        for nan_as_zero in (False, True):
            got = ops.window_select(xs, lo_key=lo, hi_key=hi, capacity=100_000, nan_as_zero=nan_as_zero)
            out[f"window-{dtype}-{lo}-{hi}-{nan_as_zero}"] = list(got)
torch.save(out, sys.argv[1])
"""


def _run(isa: str, path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SALUN_EXT_CPU_ISA=isa, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True)


@pytest.mark.skipif(not ops.has_kernel("salun_ext::masked_sgd_", "CPU"), reason="needs the compiled CPU kernels")
def test_every_instruction_set_gives_the_same_bits(tmp_path):
    results = {}
    for isa in ("default", "avx2", "avx512"):
        done = _run(isa, tmp_path / f"{isa}.pt")
        assert done.returncode == 0, done.stderr[-2000:]
        results[isa] = torch.load(tmp_path / f"{isa}.pt")
    for isa in ("avx2", "avx512"):
        for key, tensors in results["default"].items():
            for a, b in zip(tensors, results[isa][key]):
                assert torch.equal(
                    a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                    b.view(torch.int16 if b.element_size() == 2 else torch.int32),
                ), (isa, key)


@pytest.mark.skipif(not ops.has_kernel("salun_ext::masked_sgd_", "CPU"), reason="needs the compiled CPU kernels")
def test_an_unknown_instruction_set_is_refused(tmp_path):
    done = _run("sse9", tmp_path / "x.pt")
    assert done.returncode != 0 and "SALUN_EXT_CPU_ISA must be default, avx2 or avx512" in done.stderr
