"""Build script for salun-ext.

The C++ CPU kernels are always built; the CUDA kernels are built whenever nvcc is found (no GPU is needed to
compile them). Environment overrides:

    SALUN_EXT_CUDA=0|1          force a CPU-only build (0) or require the CUDA build (1)
    SALUN_EXT_NO_EXTENSION=1    skip the native extension entirely (pure-Python install)
    SALUN_EXT_DEBUG=1           a debug build of the C++ kernels (-O0 -g: compiles in a fraction of the time, runs
                                several times slower; the results are the same bits)
    MAX_JOBS                    parallel compile jobs (defaults to 2: nvcc is memory hungry)
    TORCH_CUDA_ARCH_LIST        CUDA architectures (defaults to "8.0;9.0")

If the native build fails (no compiler, broken toolkit), the install goes on without it and the package runs on
its plain-PyTorch reference kernels; `python -m salun_ext env` then says so.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

# Toolchain fixes that must happen before torch.utils.cpp_extension is imported (see docs/development.md):
# torch guesses CUDA_HOME=/usr/local when only a wrapper nvcc is on PATH, and its arch detection needs a GPU.
_no_cuda_home = not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH")
if _no_cuda_home and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
os.environ.setdefault("MAX_JOBS", "2")


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _write_build_info(package_dirs: list[Path], torch_version: str, with_cuda: bool) -> None:
    """salun_ext/_build_info.py beside the library it describes: read at import time to refuse a library built
    against another torch (C++ ABI) instead of crashing."""
    text = (
        "# Written by setup.py at build time. Do not edit.\n"
        f"TORCH_VERSION = {torch_version!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )
    for folder in package_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "_build_info.py").write_text(text)


def extensions_and_cmdclass():
    if _flag("SALUN_EXT_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "salun-ext: torch is not importable at build time; installing the pure-Python package only. "
            "Install torch first, then `pip install --no-build-isolation -e .`",
            file=sys.stderr,
        )
        return [], {}

    force_cuda = _flag("SALUN_EXT_CUDA")
    with_cuda = _nvcc_available() if force_cuda is None else force_cuda == "1"
    if force_cuda == "1" and not _nvcc_available():
        raise SystemExit("SALUN_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME)")

    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -ffp-contract=off: no FMA contraction (the kernels equal the reference bit for bit); -fno-math-errno: sqrtf
    # without the errno branch, so the step loops vectorize (the result is the same correctly rounded sqrt)
    optimize = ["-O0", "-g"] if _flag("SALUN_EXT_DEBUG") == "1" else ["-O3"]
    cxx = [*optimize, "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    extra = {"cxx": [*cxx, f'-DSALUN_EXT_TORCH_VERSION="{torch.__version__}"']}
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-lineinfo", "--fmad=false"]
        define_macros.append(("SALUN_EXT_WITH_CUDA", "1"))
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension

    ext = ext_cls(
        name="salun_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        py_limited_api=True,
    )

    class OptionalBuildExtension(BuildExtension):
        """Builds the native library, but never fails the install: the package works on reference kernels."""

        def run(self):
            # build_py has already copied the package into build_lib, which a wheel packs; an in-place (editable)
            # build imports the source tree instead
            folder = ROOT / "salun_ext" if self.inplace else Path(self.build_lib) / "salun_ext"
            _write_build_info([folder], torch.__version__, with_cuda)
            try:
                super().run()
            except Exception as exc:
                if force_cuda == "1":
                    raise
                print(
                    f"salun-ext: native build failed ({exc}); the package will use its reference kernels.",
                    file=sys.stderr,
                )

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
