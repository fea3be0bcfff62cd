"""The package layout the README's "How it is built" promises, read from the code's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from gl_nvidia.image.assemble import NODE_SHARED

SRC = Path(__file__).resolve().parent.parent / "src" / "gl_nvidia"


def _imports(path: Path, root: Path = SRC) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too), relative imports
    resolved against the file's own package (`root` is gl_nvidia's directory)."""
    found: set[str] = set()
    package = ".".join(("gl_nvidia", *path.relative_to(root).parent.parts))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            if module == "gl_nvidia" or node.module is None:  # `from gl_nvidia import x`, `from . import x`
                found |= {f"{module}.{a.name}" for a in node.names}
    return found


def _package_imports(package: str) -> dict[Path, set[str]]:
    return {p: _imports(p) for p in sorted((SRC / package).rglob("*.py"))}


def test_the_node_runtime_imports_only_the_standard_library_and_the_bundle() -> None:
    """It runs inside the driver image, which carries python3 and nothing from PyPI: of gl_nvidia, only
    its own package and what the image ships beside it (bundle.py, arches.py)."""
    assert {"bundle.py", "arches.py"} <= set(NODE_SHARED)
    allowed = {"gl_nvidia", *(f"gl_nvidia.{Path(n).stem}" for n in NODE_SHARED if n != "__init__.py")}
    for path, modules in _package_imports("node").items():
        for m in modules:
            top = m.split(".")[0]
            if top == "gl_nvidia":
                assert m in allowed or m.startswith("gl_nvidia.node"), f"{path.name} imports {m}"
            else:
                assert top in sys.stdlib_module_names or top == "__future__", f"{path.name} imports {m}"
    for name in NODE_SHARED:  # what they import in turn: each other and the standard library
        for m in _imports(SRC / name):
            assert m in allowed or m.split(".")[0] in sys.stdlib_module_names or m == "__future__", f"{name} imports {m}"


def test_stages_import_only_the_stages_before_them() -> None:
    """catalog -> modbuild -> image -> registry -> deploy, with release above them: no stage reaches back."""
    order = ["catalog", "modbuild", "image", "registry", "deploy"]
    for i, stage in enumerate(order):
        later = {f"gl_nvidia.{s}" for s in [*order[i + 1:], "release", "cli"]}
        for path, modules in _package_imports(stage).items():
            back = sorted(m for m in modules if any(m == x or m.startswith(x + ".") for x in later))
            assert not back, f"{stage}/{path.name} imports {back}"


def test_the_registry_stage_does_not_import_the_image_stage() -> None:
    """README: image and registry share only the OCI model (`oci.py`) and the references (`reference.py`)."""
    for path, modules in _package_imports("registry").items():
        image = sorted(m for m in modules if m == "gl_nvidia.image" or m.startswith("gl_nvidia.image."))
        assert not image, f"registry/{path.name} imports {image}"


def test_relative_imports_are_read(tmp_path: Path) -> None:
    """A relative import names the same module as its absolute spelling, so no rule above can be evaded."""
    sample = tmp_path / "node" / "sample.py"
    sample.parent.mkdir()
    sample.write_text("from . import decide\nfrom .. import image\nfrom ..registry.client import X\n")
    assert _imports(sample, tmp_path) == {"gl_nvidia.node", "gl_nvidia.node.decide", "gl_nvidia", "gl_nvidia.image",
                                          "gl_nvidia.registry.client"}
