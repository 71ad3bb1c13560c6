"""The bottom layer of the package beside `ops`: errors, files, devices, seeding. Imports nothing else of salun_ext.

errors.py    UsageError: bad input from a user (named argument, expected and actual value)
files.py     atomic writes and the one JSON writer (atomic, NaN-clean)
devices.py   device resolution, rank-0 checks
seeding.py   seed_everything, derive_seed and epoch_generator(seed, epoch, stream) with named streams
"""

from salun_ext.utils.devices import is_main_process, resolve_device
from salun_ext.utils.errors import MissingFileError, Terminated, UsageError
from salun_ext.utils.files import OutputError, OutputFolder, atomic_save, write_json
from salun_ext.utils.seeding import STREAMS, derive_seed, epoch_generator, seed_everything, stream_seed

__all__ = [
    "STREAMS",
    "MissingFileError",
    "OutputError",
    "OutputFolder",
    "Terminated",
    "UsageError",
    "atomic_save",
    "derive_seed",
    "epoch_generator",
    "is_main_process",
    "resolve_device",
    "seed_everything",
    "stream_seed",
    "write_json",
]
