"""The README's API example runs as written (it is the first code a user copies)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## API in ", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # it saves mask.safetensors
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["mask"].density == 0.5
    assert (tmp_path / "mask.safetensors").exists()
    assert type(scope["opt"]).__name__ == "MaskedAdamW"
