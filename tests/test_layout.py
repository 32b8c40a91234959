"""The pack's boundaries: ``ovis_u1/`` is a plain PyTorch library, and only ``nodes/comfy_bridge/`` touches
ComfyUI. Checked on the source (imports) and by importing everything with no ComfyUI present."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pack import ROOT

COMFY_MODULES = {"comfy", "comfy_extras", "folder_paths", "latent_preview", "server", "execution", "comfy_api"}
FORBIDDEN_EVERYWHERE = {"diffusers", "torchvision"}
# Citations of the team's internal specification, which a reader of the repository cannot open (built from parts so
# that this file does not match itself).
UNPUBLISHED_CITATIONS = ("SPEC" + " §", "SPEC" + ".md")


def imported_roots_of(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The top-level packages an import statement names (none for a relative import)."""
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    return {node.module.split(".")[0]} if node.level == 0 and node.module else set()


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            roots |= imported_roots_of(node)
    return roots


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_library_imports_no_comfyui_and_no_diffusers():
    for path in sources("ovis_u1"):
        bad = imported_roots(path) & (COMFY_MODULES | FORBIDDEN_EVERYWHERE | {"nodes"})
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_bridge_touches_comfyui():
    for path in sources("nodes"):
        roots = imported_roots(path)
        assert not roots & FORBIDDEN_EVERYWHERE, f"{path.relative_to(ROOT)} imports {sorted(roots & FORBIDDEN_EVERYWHERE)}"
        if "comfy_bridge" not in path.relative_to(ROOT).parts:  # the nodes: ComfyUI's public node API only
            internals = roots & (COMFY_MODULES - {"comfy_api"})
            assert not internals, f"{path.relative_to(ROOT)} imports ComfyUI: {sorted(internals)}"


def test_no_remote_code_or_auto_registry():
    for path in sources("ovis_u1") + sources("nodes"):
        text = path.read_text()
        for needle in ("trust_remote_code=True", "AutoConfig.register", "AutoModel.register", "AutoTokenizer"):
            assert needle not in text, f"{path.relative_to(ROOT)} uses {needle}"


def test_the_library_imports_without_comfyui_or_flash_attn():
    """A fresh interpreter: the library imports with no ComfyUI on the path (the V3 nodes import only inside ComfyUI:
    tests/comfyui/test_nodes.py)."""
    code = (
        "import sys, importlib; sys.path.insert(0, %r);"
        "import ovis_u1, ovis_u1.__main__, ovis_u1.smoke;"
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules;"
        "assert 'flash_attn' not in sys.modules and 'diffusers' not in sys.modules;"
        "print('ok')" % str(ROOT)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert importlib.import_module("ovis_u1").load_model


# ----------------------------------------------------------------------------------- the pack's own imports
PACK_SOURCES = [ROOT / "__init__.py", *sources("nodes"), *sources("ovis_u1")]
# Third-party packages the library may import inside a function: optional ones, absent from most installs.
OPTIONAL_PACKAGES = {"flash_attn", "gguf", "tqdm"}  # tqdm: only the converter's nicer progress bar


def module_name(path: Path) -> str:
    """nodes/comfy_bridge/memory.py → nodes.comfy_bridge.memory; a package's __init__.py → the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


PACK_MODULES = {module_name(p) for p in PACK_SOURCES}


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def module_level(tree: ast.Module):
    """The statements that run when the module is imported (inside if/try/with too, not inside functions or
    classes: an import there runs later, when the function is called)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
            for handler in getattr(node, "handlers", []):
                todo.extend(handler.body)


def later_imports(tree: ast.Module):
    """The import statements inside functions and classes: those that run later than the module's import."""
    at_import = set(map(id, module_level(tree)))
    return [node for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in at_import]


def pack_imports(path: Path, at_import: bool = False) -> dict[str, int]:
    """The pack's own modules (nodes.*, the root package '' and ovis_u1.*) that ``path`` imports by relative
    imports (``at_import``: only those made when the module is imported), each with the line of its first import;
    ``from . import name`` counts as the submodule ``name`` where there is one, else as the package."""
    own = module_name(path).split(".") if module_name(path) else []
    package = own if is_package(path) else own[:-1]
    found: dict[str, int] = {}
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in module_level(tree) if at_import else ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        assert node.level - 1 <= len(package), f"{path.relative_to(ROOT)}: import beyond the pack"
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
        for alias in node.names:
            sub = f"{target}.{alias.name}" if target else alias.name
            module = sub if sub in PACK_MODULES else target
            found[module] = min(found.get(module, node.lineno), node.lineno)
    return found


def test_the_pack_never_touches_sys_path():
    """The pack reaches its library by relative imports (as ComfyUI imports a node pack), never by adding a folder
    to sys.path, which would import a second, different copy of the library (or another pack's)."""
    for path in PACK_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value  # sys.path.append(...), sys.path.insert(...), sys.path.extend(...)
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "site":
                    target = node.func  # site.addsitedir(...)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t for t in targets if ast.unparse(t) in ("sys.path", "sys.path[:]")), None)
            text = ast.unparse(target) if target is not None else ""
            assert text not in ("sys.path", "site.addsitedir"), (
                f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)} — use a relative import")
        roots = imported_roots(path)
        assert not roots & {"nodes", "ovis_u1"}, f"{path.relative_to(ROOT)}: absolute import of the pack's own modules"


def test_no_import_circle_and_no_arrow_back_up():
    """The pack's modules (``ovis_u1/``, ``nodes/``, the root ``__init__.py``) form no import circle, counting every
    import wherever it stands: at module level, and inside functions and classes (an import there is an arrow all the
    same, one that only runs later). With no circle the modules stack into floors, each importing only what lies
    below it; an arrow back up is one that closes a circle, and that is what this test refuses. A package's
    ``__init__`` is a module like the others: a submodule taking a name from its own package's ``__init__`` (which
    imports the submodules) is an arrow back up. Checked on the source (ast), without importing anything: ``nodes/``
    imports ComfyUI, which need not be installed here."""
    graph = {}
    for path in PACK_SOURCES:
        name = module_name(path)
        graph[name] = {t: (path, line) for t, line in pack_imports(path).items() if t in PACK_MODULES and t != name}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circle = [*trail[trail.index(target):], module, target] if target in trail else [module, target]
                path, line = graph[module][target]
                raise AssertionError(f"import circle: {' → '.join(m or '__init__' for m in circle)} "
                                     f"(closed by {path.relative_to(ROOT)}:{line})")
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_library_imports_at_module_level():
    """``ovis_u1/`` imports everything at module level, so that its arrows are all visible at the top of each file
    and run once: no import inside a function or a class, except an optional third-party package that most installs
    lack (flash-attn, gguf)."""
    offenders = []
    for path in sources("ovis_u1"):
        for node in later_imports(ast.parse(path.read_text(), filename=str(path))):
            roots = ({alias.name.split(".")[0] for alias in node.names} if isinstance(node, ast.Import)
                     else {(node.module or "").split(".")[0] if node.level == 0 else "."})
            if not roots <= OPTIONAL_PACKAGES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "move these imports to the top of the module:\n" + "\n".join(offenders)


def test_the_error_classes_are_a_leaf():
    """``ovis_u1/errors.py`` imports nothing of the pack, so that every module can raise the pack's errors."""
    assert not pack_imports(ROOT / "ovis_u1" / "errors.py")


def test_the_bridge_never_imports_a_node_module():
    """nodes/comfy_bridge is below the nodes: it gives them ComfyUI's objects and never reaches back into them."""
    for path in sorted((ROOT / "nodes" / "comfy_bridge").rglob("*.py")):
        for target in pack_imports(path):
            below = target.startswith("ovis_u1") or target.startswith("nodes.comfy_bridge")
            assert below, f"{path.relative_to(ROOT)} imports {target or 'the pack'}"


def test_nothing_unpickles():
    """No file of the pack or its benchmarks loads a pickle (``torch.load`` without ``weights_only=True``,
    ``pickle``, ``np.load(allow_pickle=True)``): a pickle runs code when it is read, and the registry's scanners flag
    it. Caches are safetensors or JSON."""
    offenders = []
    for path in sources("ovis_u1") + sources("nodes") + sources("bench") + sources("tests"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)) and imported_roots_of(node) & {"pickle", "dill"}:
                offenders.append(f"{where}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                options = {k.arg: ast.unparse(k.value) for k in node.keywords}
                call = ast.unparse(node.func)
                if (call == "torch.load" and options.get("weights_only") != "True") or (
                        call in ("np.load", "numpy.load") and options.get("allow_pickle") == "True"):
                    offenders.append(f"{where}: {ast.unparse(node)}")
    assert not offenders, "store it as safetensors or JSON instead:\n" + "\n".join(offenders)


def tracked_text_files() -> list[Path]:
    """Every file git tracks in the repository, as text; binary files (a NUL byte or not UTF-8) are left out."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, timeout=60, check=True)
    files = []
    for name in out.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_no_file_cites_the_unpublished_spec():
    """Comments cite what a reader can open (the Ovis-U1 paper, the official code, ComfyUI/diffusers/transformers
    source), never the team's internal specification."""
    offenders = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in UNPUBLISHED_CITATIONS):
                offenders.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()}")
    if offenders and all(o.startswith("nodes/") for o in offenders):
        pytest.xfail("nodes/ is being rewritten by the lead")  # only nodes/ still cites it; anything else fails
    assert not offenders, "cite the paper or the official code instead:\n" + "\n".join(offenders)
