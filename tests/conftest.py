import os

# Idle OpenMP threads must sleep, not spin: tests run many tiny ops, and spinning workers on a busy 2-core machine
# make each op ~30x slower. Set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

import salun_ext


def pytest_report_header(config):
    status = salun_ext.native
    state = "loaded" if status.loaded else f"NOT loaded ({status.reason})"
    return f"salun_ext native kernels: {state}; CUDA devices: {torch.cuda.device_count()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


from tests.helpers import REQUIRE_NATIVE  # noqa: E402  (one definition)

NATIVE_SKIP_REASON = (
    "kernel vs reference: the native library salun_ext._C is not loaded "
    f"({salun_ext.native.reason}), so the ops ARE the reference and the comparison would be vacuous"
)
_native_skipped: list[str] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "native_vs_reference: compares a compiled kernel with the reference kernel; skipped (counted, with the "
        "reason) when the native library is absent, and failed instead under SALUN_EXT_REQUIRE_NATIVE=1",
    )


def pytest_collection_modifyitems(config, items):
    if not salun_ext.native.loaded:
        for item in items:
            if "native_vs_reference" not in item.keywords:
                continue
            if not REQUIRE_NATIVE:  # under `make test` they fail instead (pytest_runtest_setup)
                _native_skipped.append(item.nodeid)
                item.add_marker(pytest.mark.skip(reason=NATIVE_SKIP_REASON))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    # `make test` sets SALUN_EXT_REQUIRE_NATIVE=1: a failed build must neither pass as green nor skip
    if REQUIRE_NATIVE and not salun_ext.native.loaded and "native_vs_reference" in item.keywords:
        pytest.fail(f"SALUN_EXT_REQUIRE_NATIVE=1 but the native library is not loaded: {salun_ext.native.reason}")


def pytest_terminal_summary(terminalreporter):
    if not salun_ext.native.loaded:
        terminalreporter.write_sep(
            "=",
            f"salun_ext native kernels NOT loaded ({salun_ext.native.reason}): every kernel test ran on the "
            f"reference kernels; {len(_native_skipped)} kernel-vs-reference test(s) skipped as vacuous",
            yellow=True,
        )
