"""`python -m salun_ext ...`: the command-line interface (see salun_ext/cli.py); `env` prints diagnostics."""

from salun_ext.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
