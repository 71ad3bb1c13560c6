"""A rank that never comes up: the others end with our DistributedError (naming the cause), not gloo's timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

PROBE = """
from salun_ext.distributed.runtime import DistributedError, init_distributed
try:
    init_distributed(timeout_s=3, device="cpu")
except DistributedError as exc:
    print("DistributedError:", exc)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_frozen_at_start_up_gives_a_distributed_error():
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # rank 1 never starts
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DistributedError: rank 0: the 2 processes did not all join the process group within 3 s" in done.stdout
