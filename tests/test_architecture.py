"""The package keeps the shape docs/ARCHITECTURE.md describes.

- every top-level package and module of ``llamalab/`` has its line in docs/ARCHITECTURE.md (a new
  one added without a line fails here);
- every CLI word maps to exactly one module under ``llamalab/commands/``, and every command module
  is reachable from the CLI;
- a command module holds only its ``Config`` and ``main()`` (library code lives in the stages);
- the library never imports ``llamalab.commands`` (except the documented shims) and the model
  never imports training, data, serving or evaluation code.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from llamalab.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "llamalab"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
# documented `python -m` paths kept as shims onto their command (README, docs/distributed.md, slurm example)
SHIMS = {"llamalab/train/pretrain.py", "llamalab/finetune/sft.py"}


def _cli_modules(table: dict = COMMANDS) -> list[str]:
    out = []
    for target in table.values():
        out.extend(_cli_modules(target) if isinstance(target, dict) else [target])
    return out


def _top_level_names() -> list[str]:
    names = []
    for p in sorted(PKG.iterdir()):
        if p.is_dir() and (p / "__init__.py").exists():
            names.append(f"{p.name}/")
        elif p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"):
            names.append(p.name)
    return names


def test_every_top_level_package_is_on_the_architecture_page() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [n for n in _top_level_names() if f"{n}" not in text]
    assert not missing, f"docs/ARCHITECTURE.md has no line for {missing}: add one when adding a package"


def test_architecture_page_names_only_existing_packages() -> None:
    text = DOC.read_text(encoding="utf-8")
    # the package map block lists entries as `  name/` or `  name.py` at two-space indent
    block = text.split("```text", 1)[1].split("```", 1)[0]
    listed = [ln.split()[0] for ln in block.splitlines() if ln.startswith("  ") and not ln.startswith("   ")]
    stale = [n for n in listed if not (PKG / n.rstrip("/")).exists()]
    assert not stale, f"docs/ARCHITECTURE.md lists {stale}, which are not in llamalab/"


def test_every_cli_word_maps_to_one_command_module() -> None:
    mods = _cli_modules()
    assert len(mods) == len(set(mods)), "two CLI words share a module"
    for m in mods:
        assert m.startswith("llamalab.commands."), f"{m}: entry points live under llamalab/commands/"
        assert importlib.util.find_spec(m) is not None, f"{m} does not exist"
    on_disk = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (PKG / "commands").rglob("*.py")
               if p.name != "__init__.py"}
    assert on_disk == set(mods), f"command modules without a CLI word: {sorted(on_disk - set(mods))}"


def _top_defs(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("module", _cli_modules())
def test_command_module_holds_only_config_and_main(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    defs = _top_defs(path)
    assert set(defs) <= {"Config", "main"}, f"{path.relative_to(ROOT)} defines {defs}: move helpers to the library"
    src = path.read_text(encoding="utf-8")
    assert "def main" in src or "import Config, main" not in src, f"{path}: still a re-export placeholder"
    assert "Config" in defs and "main" in defs, f"{path.relative_to(ROOT)} must define Config and main()"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


def test_library_does_not_import_commands() -> None:
    bad = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        if rel.startswith("llamalab/commands/") or rel in SHIMS or rel == "llamalab/cli.py":
            continue
        if any(m.startswith("llamalab.commands") for m in _imports(p)):
            bad.append(rel)
    assert not bad, f"library modules import llamalab.commands: {bad}"


def test_model_imports_no_stage_code() -> None:
    allowed = ("llamalab.model", "llamalab.common", "llamalab.config", "llamalab.native")
    bad = {}
    for p in (PKG / "model").rglob("*.py"):
        if p.name == "folder.py":  # the loader reads every format (interop, tokenizers); the nn.Module does not
            continue
        mods = [m for m in _imports(p) if m.startswith("llamalab") and not m.startswith(allowed)]
        if mods:
            bad[p.name] = mods
    assert not bad, f"the model imports stage code: {bad}"


def test_native_builder_is_stdlib_only() -> None:
    """llamalab/native.py compiles the C kernels for the model and the decoder: it imports nothing of llamalab's."""
    mods = [m for m in _imports(PKG / "native.py") if m.startswith("llamalab")]
    assert not mods, mods
