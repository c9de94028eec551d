"""The package's shape: __all__ everywhere, honest re-exports, one pixel limit, one capture mechanism."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "graft"
MODULES = sorted(PACKAGE.rglob("*.py"))
PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)


def _dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_declares_all(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "__all__" in ast.unparse(node).split("=")[0]
               for node in tree.body), f"{path} has no __all__"


@pytest.mark.parametrize("folder", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_subpackage_exports_resolve_and_never_shadow_a_submodule(folder):
    package = importlib.import_module(_dotted(folder / "__init__.py"))
    submodules = {p.stem for p in folder.glob("*.py")}
    submodules |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    assert package.__all__, f"{package.__name__} re-exports nothing"
    shadowing = set(package.__all__) & submodules
    assert not shadowing, f"{package.__name__} re-exports {shadowing}, which would hide the submodule of that name"
    exports = getattr(package, "_EXPORTS", {})  # graft.cli imports its two names eagerly: the CLI needs them
    for name in package.__all__:
        value = getattr(package, name)
        if name in exports:
            assert value is getattr(importlib.import_module(exports[name]), name)


def test_importing_a_subpackage_pulls_in_neither_torch_nor_pil():
    names = " ".join(_dotted(folder / "__init__.py") for folder in PACKAGES)
    code = (f"import importlib, sys\nfor name in '{names}'.split(): importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'PIL', 'timm', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_the_pixel_limit_is_written_once():
    from graft.config import FitConfig
    from graft.data.images import DEFAULT_MAX_PIXELS, decode_image, load_image
    from graft.utils.limits import DEFAULT_MAX_PIXELS as LIMIT

    assert DEFAULT_MAX_PIXELS is LIMIT and FitConfig().data.max_image_pixels == LIMIT
    for function in (load_image, decode_image):
        assert function.__defaults__[-1] == LIMIT
    literal = [str(p.relative_to(ROOT)) for p in MODULES if "89_478_485" in p.read_text()]
    assert literal == ["graft/utils/limits.py"], literal


def test_one_hook_and_stop_mechanism():
    """Only graft.models.surgery stops a forward pass; other hooks only observe (in call order, by tensor id)."""
    stopping = [str(p.relative_to(ROOT)) for p in MODULES if "StopForward" in p.read_text()]
    assert stopping == ["graft/models/surgery.py"]
    hooking = {str(p.relative_to(ROOT)) for p in MODULES if "register_forward_hook" in p.read_text()}
    assert hooking == {"graft/models/surgery.py", "graft/analysis/diagnose.py", "graft/models/batchnorm.py"}


def _bypassing_loaders(path: Path) -> list[str]:
    """``DataLoader(...)`` calls in ``path`` that do not take their keywords from ``loader_options``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "DataLoader":
            spread = [k.value for k in node.keywords if k.arg is None]
            if not any(isinstance(v, ast.Call) and ast.unparse(v.func).endswith("loader_options") for v in spread):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_data_loader_takes_its_options_from_loader_options():
    """One builder for workers, pinning and prefetching: a DataLoader without ``**loader_options(...)`` bypasses it."""
    bypassing = [where for path in MODULES for where in _bypassing_loaders(path)]
    assert bypassing == []
    assert len([p for p in MODULES if "DataLoader(" in p.read_text()]) >= 6  # the walk does see the loaders
