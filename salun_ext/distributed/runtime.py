"""Process-group runtime shared by every command: join the torchrun group, rank-0-only output, clear failures.

    ctx = init_distributed()          # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    ctx.is_main, ctx.rank, ctx.world_size, ctx.device, ctx.engine_mode
    ctx.close()

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) the context is a single process and nothing is initialised, so
the same code runs both ways. Collectives issued by this library go through `Collectives`, which waits with a
timeout and turns a peer that crashed, hung or ran different code into a `DistributedError` that says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from salun_ext.utils.errors import UsageError

LOG = logging.getLogger("salun_ext")

DEFAULT_TIMEOUT_S = 600.0  # process-group timeout: how long a rank waits for a peer before failing
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Processes of one group disagree, a peer failed, or a collective timed out."""


# -------------------------------------------------------------------------------------------------------------
# Joining the group


@dataclasses.dataclass
class DistContext:
    """Where this process stands: rank, world size, device, and the process group (None when single)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    group: dist.ProcessGroup | None = None
    owns_group: bool = False  # whether close() destroys the group (it was created by init_distributed)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def engine_mode(self) -> str:
        """EngineConfig.distributed for a plain (non-sharded) model: 'ddp' under torchrun, else 'none'."""
        return "ddp" if self.is_distributed else "none"

    def share(self, items):
        """This rank's share of a sequence: items rank, rank + W, rank + 2W, ... (everything in one process)."""
        return items[self.rank :: self.world_size]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def init_distributed(
    backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "auto"
) -> DistContext:
    """Join the process group that torchrun describes in the environment; a single-process context without it.

    Args:
        backend: "nccl", "gloo", ... (default: nccl when the device is CUDA, else gloo).
        timeout_s: how long any collective waits for the other ranks before the run fails with an error.
        device: "auto" (cuda:LOCAL_RANK when CUDA exists, else cpu), "cpu" or "cuda".
    An already initialised default group is reused (and left open on close()).
    """
    if timeout_s <= 0:
        raise UsageError(f"timeout_s must be positive, got {timeout_s}")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", default=rank % max(1, torch.cuda.device_count() or 1))
        dev = _pick_device(device, local_rank)
        return DistContext(rank, world, local_rank, dev, dist.get_backend(), dist.group.WORLD, owns_group=False)

    world = _env_int("WORLD_SIZE", default=1)
    if world <= 1:
        return DistContext(device=_pick_device(device, 0))
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", default=rank)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start the program with torchrun "
            "(e.g. `torchrun --nproc-per-node 2 -m salun_ext ...`)"
        )
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    dev = _pick_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # a rank that never came up: gloo / the TCP store time out with their own words
        if not _is_start_up_timeout(exc):
            raise
        raise DistributedError(
            f"rank {rank}: the {world} processes did not all join the process group within {timeout_s:g} s "
            f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): a rank "
            "failed or froze at start-up; its own log says why (raise --dist-timeout for slow starts)"
        ) from exc
    return DistContext(rank, world, local_rank, dev, backend, dist.group.WORLD, owns_group=True)


def _is_start_up_timeout(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("timeout", "timed out", "deadline", "wait timeout"))


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistributedError(f"environment variable {name} is not set (start the program with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(f"LOCAL_RANK={local_rank} but this node has only {count} CUDA device(s)")
    return torch.device("cuda", local_rank)


def configure_logging(ctx: DistContext, level: int = logging.INFO) -> None:
    """INFO logging on rank 0 only; the other ranks log warnings and errors, prefixed with their rank."""
    prefix = f"[rank {ctx.rank}] " if ctx.is_distributed else ""
    logging.basicConfig(format=f"{prefix}%(levelname)s %(name)s: %(message)s", force=True)
    LOG.setLevel(level if ctx.is_main else logging.WARNING)


def main_print(*args, **kwargs) -> None:
    """print() on rank 0 only (or always, without a process group)."""
    from salun_ext.utils import is_main_process

    if is_main_process():
        print(*args, **kwargs)


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of small float lists over the default group (as is without one): metrics, loss means."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def current_world() -> tuple[int, int]:
    """(rank, world_size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -------------------------------------------------------------------------------------------------------------
# Collectives with timeouts, error translation and byte accounting


COLLECTIVE_FAILURE_MARKERS = (
    "Connection closed by peer",
    "Connection reset",
    "Connection refused",
    "timed out",
    "Timed out",
    "Broken pipe",
    "NCCL error",
    "NCCL communicator",
    "Socket Timeout",
)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether an exception comes from a failed collective (a peer crashed, hung or left)."""
    if isinstance(exc, DistributedError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in COLLECTIVE_FAILURE_MARKERS)


def collective_failure(what: str, exc: BaseException, rank: int, world: int) -> DistributedError:
    return DistributedError(
        f"{what}: rank {rank} of {world} lost the other processes: a peer crashed, was killed, timed out or runs "
        f"different code (check the other ranks' logs for the first error). Underlying error: {exc}"
    )


class Collectives:
    """The collectives one distributed operation issues: one group, one timeout, one communication device.

    Every call waits at most `timeout_s`; failures become DistributedError naming `what`. `bytes_sent` counts the
    payload each call contributes from this rank (the all-reduce / all-gather input), for the benchmarks.
    """

    def __init__(self, group: dist.ProcessGroup | None, *, timeout_s: float | None, what: str) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(f"{what}: a process_group was given but torch.distributed is not initialised")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise DistributedError(f"{what}: this process is not a member of the given process group")
        self.timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        self.what = what
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.bytes_sent = 0
        self.calls = 0

    def _wait(self, issue: Callable[[], dist.Work | None]) -> None:
        try:
            work = issue()
            if work is not None:
                if self.timeout is not None:
                    work.wait(timeout=self.timeout)
                else:
                    work.wait()
        except RuntimeError as exc:
            if is_collective_failure(exc):
                raise collective_failure(self.what, exc, self.rank, self.world) from exc
            raise

    def _account(self, t: torch.Tensor) -> None:
        self.bytes_sent += t.numel() * t.element_size()
        self.calls += 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a tensor on the communication device)."""
        t = t.to(self.device).contiguous()
        self._account(t)
        self._wait(lambda: dist.all_reduce(t, group=self.group, async_op=True))
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank `src`'s tensor on every rank (returns a tensor on the communication device)."""
        t = t.to(self.device).contiguous()
        if self.rank == src:
            self._account(t)
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        self._wait(lambda: dist.broadcast(t, src=root, group=self.group, async_op=True))
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's tensor (same shape and dtype on every rank)."""
        t = t.to(self.device).contiguous()
        out = torch.empty((self.world * t.numel(),), dtype=t.dtype, device=self.device)
        self._account(t)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        self._wait(lambda: gather(out, t.reshape(-1), group=self.group, async_op=True))
        return out.view(self.world, *t.shape)

    def gather_varlen(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """1-D tensors of different lengths gathered on `dst` (None elsewhere)."""
        t = t.reshape(-1).to(self.device)
        lengths = self.all_gather(torch.tensor([t.numel()], dtype=torch.int64)).reshape(-1).tolist()
        longest = max(lengths)
        padded = torch.zeros(longest, dtype=t.dtype, device=self.device)
        padded[: t.numel()] = t
        bufs = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == dst else None
        self._account(padded)
        dst_global = dist.get_global_rank(self.group, dst) if self.group is not None else dst
        self._wait(lambda: dist.gather(padded, bufs, dst=dst_global, group=self.group, async_op=True))
        if bufs is None:
            return None
        return [b[:n] for b, n in zip(bufs, lengths)]

    def all_gather_bytes(self, payload: bytes, limit: int) -> list[bytes]:
        """Every rank's byte string (each truncated to `limit` bytes)."""
        data = payload[:limit]
        buf = torch.zeros(limit + 8, dtype=torch.uint8)
        buf[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        if data:
            buf[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        rows = self.all_gather(buf).cpu()
        out = []
        for row in rows:
            n = int.from_bytes(bytes(row[:8].tolist()), "little")
            out.append(bytes(row[8 : 8 + n].tolist()))
        return out
