"""UsageError: the one error type for bad input, so that the CLI can tell a user's mistake from a bug.

Library code raises `UsageError` (a ValueError, so `except ValueError` keeps working) when an argument, option or
file a user gave cannot be used; its message names the argument, what was expected and what was given. Only the
CLI boundary (`salun_ext.cli.main`) turns it into one line on stderr and exit status 2. Any other exception inside
the library (TypeError, KeyError, RuntimeError, ...) is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class UsageError(ValueError):
    """Bad input: the message names the argument, the expected and the actual value."""


def usage_error(argument: str, expected: str, got: Any) -> UsageError:
    """UsageError("`argument`: expected ..., got ...")."""
    return UsageError(f"{argument}: expected {expected}, got {got!r}")


def check_choice(argument: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` when it is one of `choices`, else a UsageError listing them."""
    options = list(choices)
    if value not in options:
        raise UsageError(f"{argument}: expected one of {', '.join(map(str, options))}; got {value!r}")
    return value


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist (both a UsageError and a FileNotFoundError)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that a run ends the same orderly way (exit 143)."""
