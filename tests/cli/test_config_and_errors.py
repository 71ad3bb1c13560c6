"""--config for every command family, checked like the flags; the one error boundary of `salun_ext.cli.main`."""

from __future__ import annotations

import argparse
import json

import pytest

from salun_ext.cli import build_parser, main, parse_args
from salun_ext.utils import UsageError


def _leaf_parsers(parser: argparse.ArgumentParser, words=()):
    """(command words, parser) of every runnable command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, (*words, name))


def test_every_command_takes_a_config_file():
    commands = list(_leaf_parsers(build_parser()))
    assert len(commands) >= 13  # env, 5 classification, 2 lm, 6 diffusion
    for words, parser in commands:
        assert any("--config" in a.option_strings for a in parser._actions), " ".join(words)


def test_config_values_are_checked_like_the_flags(tmp_path):
    def refused(text: str, match: str, command=("reproduce",)):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UsageError, match=match):
            parse_args([*command, "--config", str(path)])

    refused("resume: 'no'\n", r"option 'resume' \(--resume\): expected true or false")
    refused("progress: 'false'\n", "expected true or false")
    refused("seeds: [1, two]\n", "expected a int|expected an int")
    refused("batch_size: 12.7\n", r"option 'batch_size' \(--batch-size\): expected an int, got 12.7")
    refused("batch_size: true\n", "expected a int, got True")
    refused("amp: fp8\n", "expected one of none, bf16, fp16; got 'fp8'")
    refused("threads: two\n", r"option 'threads'")
    refused("seeds: [1\n", "not valid YAML")
    refused("- 1\n- 2\n", "expected a mapping of option names")
    path = tmp_path / "ok.yaml"
    path.write_text("progress: false\nresume: true\nbatch_size: 32\nseeds: 7\n")
    args = parse_args(["reproduce", "--config", str(path)])
    assert args.progress is False and args.resume is True and args.batch_size == 32 and args.seeds == [7]


def test_flags_win_over_the_file_for_every_family(tmp_path):
    path = tmp_path / "lm.json"
    path.write_text(json.dumps({"model": "m", "forget": "f.jsonl", "lr": 0.5, "epochs": 3, "method": "ga"}))
    args = parse_args(["lm", "unlearn", "--config", str(path), "--out", "o", "--lr", "0.25"])
    assert (args.model, args.forget, args.epochs, args.method) == ("m", "f.jsonl", 3, "ga") and args.lr == 0.25
    path.write_text(json.dumps({"model": "m", "forget": "f", "method": "dpo"}))
    methods = "ga, npo, idk, random_label, simnpo, graddiff, rmu"
    with pytest.raises(UsageError, match=f"expected one of {methods}; got 'dpo'"):
        parse_args(["lm", "unlearn", "--config", str(path), "--out", "o"])


def test_a_usage_error_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["reproduce", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("salun-ext reproduce: error: --config: file not found")
    assert "Traceback" not in err


def test_other_errors_keep_their_traceback(monkeypatch):
    """A KeyError inside a command is a bug: main must not turn it into a quiet exit status."""

    def broken(args):
        raise KeyError("an internal bug")

    parser = build_parser()
    args = parser.parse_args(["env"])
    parsed = argparse.Namespace(**{**vars(args), "handler": broken})
    monkeypatch.setattr("salun_ext.cli.parse_args", lambda argv=None: parsed)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["env"])
