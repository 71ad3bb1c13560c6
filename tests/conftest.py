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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


REQUIRE_NATIVE = os.environ.get("SALUN_EXT_REQUIRE_NATIVE") == "1"
