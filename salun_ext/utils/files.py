"""File writes that never leave a half-written file: `atomic_save` and the one JSON writer, `write_json`."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from salun_ext.utils.errors import UsageError


class OutputError(UsageError):
    """An output file or folder cannot be written (not a folder, read-only, no space left)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike, saver: Callable = torch.save) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a crash or a full disk never
    leaves a half-written file (nor the temporary one, for any error Python sees). The file gets the permissions
    of an ordinary new file (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        saver(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
            raise OutputError(f"{path}: could not be written ({exc.strerror}); nothing was replaced") from None
        raise
    except RuntimeError as exc:  # torch.save's C++ writer reports a failed write without an errno
        if _failed_write(exc):
            raise OutputError(
                f"{path}: could not be written (the write failed: no space left on the device, or a file-size "
                "limit); nothing was replaced"
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter failed", "unexpected pos")


def _failed_write(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised while handling) is torch's report of a failed file write."""
    while exc is not None:
        if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _WRITE_FAILURES):
            return True
        exc = exc.__context__
    return False


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (the folder entry), where the platform allows opening folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_clean(obj: Any) -> Any:
    """A JSON-safe copy: NaN / inf -> None (strict JSON has neither), tuples -> lists, tensors -> numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_clean(obj.item())
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write `obj` as indented, strict JSON (NaN/inf -> null; unknown types via str)."""

    def dump(value: Any, target: str) -> None:
        with open(target, "w", encoding="utf-8") as f:
            json.dump(json_clean(value), f, indent=2, default=str, allow_nan=False)
            f.write("\n")

    atomic_save(obj, path, saver=dump)


LOCK_NAME = ".salun-ext.lock"


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_save's mkstemp names: .NAME.XXXXXXXX.tmp


def _remove_orphaned_temporaries(folder: Path) -> list[Path]:
    """Remove atomic_save's temporary files that a killed run (SIGKILL, power loss) left in `folder` and in its
    checkpoint folders (`ckpt/`, the LM commands' `checkpoints/`). Only called under the folder's lock, so no run
    of ours is writing them; other subfolders are left alone (`--out` may also hold the user's own files)."""
    removed = []
    for parent in (folder, folder / "ckpt", folder / "checkpoints"):
        try:
            entries = list(parent.iterdir()) if parent.is_dir() and not parent.is_symlink() else []
            for path in entries:
                if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink()
                    removed.append(path)
        except OSError:  # unreadable, or removed meanwhile: a leftover temporary file harms nothing
            continue
    return removed


class OutputFolder:
    """An output folder held by one run: checked before any work starts, locked while the run writes to it.

        with OutputFolder("runs/x", what="--out", need_bytes=10 << 20) as out:
            ...                                   # a second run on runs/x refuses, naming this one
            out.remove_stale(["mask.safetensors"], written={"model.safetensors", "run.json"})

    Checks: the path is (or can become) a folder, it is writable, and it has `need_bytes` free. The lock is an
    advisory flock on a lock file (released by the kernel when the process dies, so a killed run never leaves the
    folder locked); the file names the holder while it runs and is left empty afterwards. Once locked, the
    temporary files a killed run's atomic writes left behind (in the folder and its checkpoint folders) are removed.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "--out", need_bytes: int = 0) -> None:
        self.folder = Path(folder)
        self.what = what
        self.need_bytes = need_bytes
        self._lock = None
        self._created = False
        self.orphans_removed: list[Path] = []

    def __enter__(self) -> OutputFolder:
        self._created = not self.folder.exists()
        self._check()
        import fcntl

        lock = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(
                f"{self.what} {self.folder} is in use by another run ({holder}); wait for it to finish or choose "
                "another folder"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}, {' '.join(sys.argv[:3])}, since {time.ctime()}\n")
        lock.flush()
        self._lock = lock
        self.orphans_removed = _remove_orphaned_temporaries(self.folder)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._lock is not None:
            # the file stays (removing it would let two later runs lock two different files); empty = free
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.close()  # closing releases the flock
            self._lock = None
            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:  # nothing was written
                os.remove(self.folder / LOCK_NAME)
                self.folder.rmdir()

    def _check(self) -> None:
        check_output_folder(self.folder, what=self.what, need_bytes=self.need_bytes)

    def remove_stale(self, outputs: list[str], *, written: set[str]) -> list[str]:
        """Remove the files of `outputs` that this run did not write (left by an earlier run in the folder)."""
        removed = []
        for name in outputs:
            path = self.folder / name
            if name not in written and path.is_file():
                path.unlink()
                removed.append(name)
        return removed


def check_output_folder(folder: str | os.PathLike, *, what: str = "--out", need_bytes: int = 0) -> Path:
    """The folder, created if needed; OutputError unless it is a writable folder with `need_bytes` free."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder}: expected a folder, but it is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder}: the folder is not writable")
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(
            f"{what} {folder}: {free / 2**20:.1f} MiB free, the run needs about {need_bytes / 2**20:.1f} MiB"
        )
    return folder


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict[str, str]) -> None:
    """Atomically write a safetensors file whose bytes depend only on its contents: the header (tensor table and
    metadata) is written with sorted keys, where safetensors itself follows hash-map order."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    data = len(text).to_bytes(8, "little") + text + raw[8 + length :]

    def dump(payload: bytes, target: str) -> None:
        with open(target, "wb") as f:
            f.write(payload)

    atomic_save(data, path, saver=dump)


def read_tensor_file(path: str | os.PathLike, what: str) -> Any:
    """A torch.save file holding tensors only (weights_only: never code), or one UsageError line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding objects beyond tensors (a pickle payload)
        raise UsageError(
            f"{what} {path}: not a readable file of tensors ({type(exc).__name__}; truncated, corrupt, or holding "
            "objects other than tensors, which are never unpickled)"
        ) from None
