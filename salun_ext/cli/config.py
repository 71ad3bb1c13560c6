"""`--config FILE` for every command: a YAML/JSON mapping of option names to values, checked like the flags.

The file's values become the parser's defaults before the command line is parsed again, so flags given on the
command line win over the file and the file wins over the built-in defaults. Keys are option names with `_` or
`-` (`batch_size` or `batch-size`). Each value is checked against its option: a flag takes a YAML/JSON boolean
(never the string "false"), a typed option a value of its type, a choice one of its choices, a list option a list.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from salun_ext.utils.errors import MissingFileError, UsageError


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (dashes -> underscores) to values."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"--config: file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: say where, in one line
        raise UsageError(f"--config {path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _check_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a {kind.__name__}, got {value!r}")
        if kind is int and value != int(value):
            raise UsageError(f"{where}: expected an int, got {value!r}")
        value = kind(value)
    elif callable(kind) and isinstance(value, str):
        value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: expected one of {', '.join(map(str, action.choices))}; got {value!r}")
    return value


def check_value(action: argparse.Action, value: Any, path: str) -> Any:
    """`value` from the config file for `action`, converted to what the flag would give; UsageError otherwise."""
    where = f"--config {path}: option '{action.dest}' ({_flag(action)})"
    if isinstance(action, (argparse._StoreConstAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false (a YAML/JSON boolean), got {value!r}")
        return value  # the option's own value (`progress: false` is --no-progress)
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # e.g. `set: {lr: 0.01}` for the repeatable --set KEY=VALUE
            return value
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_check_scalar(action, v, where) for v in items]
    if value is None:
        return None
    return _check_scalar(action, value, where)


def apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the file's values the defaults of `parser` (the command's own parser), checked option by option."""
    values = load_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}; valid: {sorted(actions)}")
    checked = {key: check_value(actions[key], value, path) for key, value in values.items()}
    for key in checked:  # a required option (or group) is satisfied by the file
        actions[key].required = False
    for group in parser._mutually_exclusive_groups:
        if any(a.dest in checked for a in group._group_actions):
            group.required = False
    parser.set_defaults(**checked)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON file with option values (flags on the command line win over it)")
    parser.set_defaults(_parser=parser)


# ------------------------------------------------------------------------------------------------ KEY=VALUE options
def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-4' -> 1e-4, 'true' -> True, 'none' -> None, '[1, 2]' -> [1, 2], else the string."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if text[:1] in "[{(":
        import yaml

        return yaml.safe_load(text.replace("(", "[").replace(")", "]"))
    return text


def parse_assignments(items: list[str] | dict, *, qualified: bool, what: str = "--set") -> dict:
    """['salun.lr=0.01', ...] -> {'salun': {'lr': 0.01}} (qualified) or ['lr=0.01'] -> {'lr': 0.01}."""
    if isinstance(items, dict):  # from a config file
        if qualified and not all(isinstance(v, dict) for v in items.values()):
            raise UsageError(f"{what}: expected a mapping METHOD -> {{PARAM: VALUE}}, got {items!r}")
        return {k: dict(v) for k, v in items.items()} if qualified else dict(items)
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        key = key.strip()
        if qualified:
            method, dot, param = key.partition(".")
            if not dot or not param:
                raise UsageError(f"{what} {item!r}: expected METHOD.PARAM=VALUE (e.g. salun.lr=0.013)")
            out.setdefault(method, {})[param] = parse_value(value)
        else:
            out[key] = parse_value(value)
    return out


def parse_sweeps(items: list[str] | dict) -> dict[str, dict[str, list]]:
    """['ga.lr=1e-5,1e-4'] -> {'ga': {'lr': [1e-5, 1e-4]}}."""
    if isinstance(items, dict):
        return {m: {p: list(v) for p, v in grid.items()} for m, grid in items.items()}
    out: dict[str, dict[str, list]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        method, dot, param = key.strip().partition(".")
        if not sep or not dot or not values:
            raise UsageError(f"--sweep {item!r}: expected METHOD.PARAM=V1,V2,... (e.g. ga.lr=1e-5,1e-4,1e-3)")
        out.setdefault(method, {})[param] = [parse_value(v) for v in values.split(",")]
    return out
