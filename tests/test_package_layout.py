"""The package's shape: __all__ everywhere, honest re-exports, one pixel limit, one capture mechanism."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "graft"
MODULES = sorted(PACKAGE.rglob("*.py"))
PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)


def _dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _declares_all(path: Path) -> bool:
    return any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "__all__" in ast.unparse(node).split("=")[0]
               for node in ast.parse(path.read_text()).body)


def _export_problems(folder: Path) -> list[str]:
    """What is wrong with a subpackage's re-exports: none, a name hiding a submodule, a name not the module's own."""
    package = importlib.import_module(_dotted(folder / "__init__.py"))
    submodules = {p.stem for p in folder.glob("*.py")}
    submodules |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    if not package.__all__:
        return [f"{package.__name__} re-exports nothing"]
    problems = [f"{package.__name__} re-exports {name}, which would hide the submodule of that name"
                for name in sorted(set(package.__all__) & submodules)]
    exports = getattr(package, "_EXPORTS", {})  # graft.cli imports its two names eagerly: the CLI needs them
    for name in package.__all__:
        try:
            value = getattr(package, name)
        except AttributeError:
            problems.append(f"{package.__name__}.{name} does not resolve")
            continue
        if name in exports and value is not getattr(importlib.import_module(exports[name]), name, None):
            problems.append(f"{package.__name__}.{name} is not {exports[name]}.{name}")
    return problems


def test_every_module_declares_all():
    """One test for every module, naming each offender at once."""
    assert len(MODULES) > 50  # the walk does find the package
    assert [str(p.relative_to(ROOT)) for p in MODULES if not _declares_all(p)] == []


def test_subpackage_exports_resolve_and_never_shadow_a_submodule():
    assert len(PACKAGES) > 5
    assert [problem for folder in PACKAGES for problem in _export_problems(folder)] == []


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


def _imported_modules(path: Path, names: set[str]) -> set[str]:
    """The graft modules ``path`` imports anywhere in it (module level, inside functions, under TYPE_CHECKING)."""
    module = _dotted(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in names:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_circle_between_graft_modules():
    """lint-imports sees layers; a circle inside one (hidden by an import inside a function) says a module holds
    two things. Every import counts, wherever it is written."""
    names = {_dotted(path) for path in MODULES}
    graph = {_dotted(path): _imported_modules(path, names) for path in MODULES}
    assert _cycles(graph) == []
    assert "graft.data.discovery" in graph["graft.data.scan"]  # the walk does see imports
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_models_layer_takes_training_policy_as_arguments():
    """Training decides (e.g. ``graft.training.recipes.starts_pretrained``); models never read the strategy."""
    reading = [str(p.relative_to(ROOT)) for p in (PACKAGE / "models").rglob("*.py")
               if "train.strategy !=" in p.read_text() or "train.strategy ==" in p.read_text()]
    assert reading == []


def _private_imports(source: str, where: str) -> list[str]:
    """``from X import _name`` sites in ``source``: a name another module keeps private is no API to build on."""
    return [f"{where}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}"
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_module_imports_another_modules_private_name():
    """Between modules only public names travel (in ``__all__``), torch's and graft's alike."""
    sites = [site for path in MODULES for site in _private_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert sites == []
    probe = "from __future__ import annotations\nfrom graft.config import flatten\n\ndef f():\n    from .x import _y\n"
    assert _private_imports(probe, "probe.py") == ["probe.py:5: from .x import _y"]  # function-level ones count


MAX_MODULE_LINES = 350  # issue 27: a module reads in one sitting; split a longer one by responsibility


def test_no_module_is_longer_than_one_sitting():
    """Every module in graft/ stays within ``MAX_MODULE_LINES`` lines (counted as ``wc -l`` does)."""
    long = {str(path.relative_to(ROOT)): lines for path in MODULES
            if (lines := path.read_bytes().count(b"\n")) > MAX_MODULE_LINES}
    assert long == {}
