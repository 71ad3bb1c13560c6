"""The library's version (pyproject.toml holds the same): part of every checkpoint's fingerprint."""

__version__ = "0.1.0"
