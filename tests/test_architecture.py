"""The package's shape, checked: layers (import-linter), who may import the CLI and the kernel layer, function size.

Each check reads the code as text (ast), so a lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "salun_ext"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def _imported(module: str, tree: ast.Module) -> set[str]:
    """Every salun_ext module `module` imports, anywhere in the file (relative imports resolved)."""
    found = set()
    package = module if module.count(".") == 0 or _is_package(module) else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("salun_ext")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("salun_ext"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").exists()


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to ('salun_ext.saliency.local' -> 'saliency')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_ops_import_nothing_else_of_the_package():
    for module, tree in _modules().items():
        if _part(module) == "ops":
            outside = {m for m in _imported(module, tree) if _part(m) not in ("ops", "")}
            assert not outside, f"{module} imports {sorted(outside)}: the kernel layer imports nothing else"


def test_only_the_kernel_layer_calls_the_raw_ops():
    # every caller goes through the typed keyword-only wrappers of salun_ext.ops, never torch.ops.salun_ext.*
    for module, tree in _modules().items():
        if _part(module) == "ops":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "salun_ext"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ops"
            ):
                raise AssertionError(f"{module}:{node.lineno} calls torch.ops.salun_ext directly; use salun_ext.ops")


def test_saliency_modules_import_one_way_and_nothing_private():
    # _threshold <- distributed <- local <- gradients (local imports distributed lazily); no cycle inside the part
    allowed = {
        "salun_ext.saliency._threshold": set(),
        "salun_ext.saliency.distributed": {"salun_ext.saliency._threshold"},
        "salun_ext.saliency.local": {"salun_ext.saliency._threshold", "salun_ext.saliency.distributed"},
        "salun_ext.saliency.gradients": {"salun_ext.saliency._threshold", "salun_ext.saliency.local"},
    }
    modules = _modules()
    for module, may_import in allowed.items():
        tree = modules[module]
        inside = {m for m in _imported(module, tree) if m.startswith("salun_ext.saliency.") and m in modules}
        assert inside <= may_import, f"{module} imports {sorted(inside - may_import)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("salun_ext"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports private {private} from {node.module}"


def test_only_the_cli_imports_the_cli():
    for module, tree in _modules().items():
        if _part(module) in ("cli", "__main__"):
            continue
        cli = {m for m in _imported(module, tree) if _part(m) == "cli"}
        assert not cli, f"{module} imports {sorted(cli)}: only salun_ext.cli and __main__ may"


def test_no_import_cycles_between_top_level_parts():
    modules = _modules()
    parts = {_part(m) for m in modules} - {"", "__main__"}
    edges: dict[str, set[str]] = {}
    for module, tree in modules.items():
        src = _part(module)
        if src not in parts:
            continue
        for target in _imported(module, tree):
            dst = _part(target)
            if dst in parts and dst != src:
                edges.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in edges for b in edges[a] if reaches(b, a, {b}))
    assert not cycles, "import cycles between parts of salun_ext: " + "; ".join(cycles)


def test_no_function_longer_than_80_lines():
    long = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)


def test_import_linter_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "import-linter is missing from this environment (requirements.txt installs it)"
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
