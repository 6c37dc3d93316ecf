"""The package's shape, checked: imports run one way between the wings, every user-facing error derives from
LlamaJaxError, and the mesh axis names are spelled in the parallelism wing only (docs/DESIGN.md)."""

import ast
import importlib
import inspect
import pathlib
import pkgutil
import re

import llama_jax
from llama_jax.errors import LlamaJaxError

ROOT = pathlib.Path(llama_jax.__file__).parent

# wing -> the wings (and top-level modules) it may import, lazily or not. Thin command-line shims
# (llama_jax/convert.py, data.py) sit above everything and are not listed.
ALLOWED = {
    "errors": set(),
    "presets": set(),
    "config": {"errors", "presets"},
    "text": {"errors", "config"},
    "model": {"errors", "config", "presets"},
    "parallel": {"errors", "config", "presets", "model"},
    "cpu": {"errors", "config", "presets", "model", "parallel"},
    "io": {"errors", "config", "presets", "model", "parallel"},
    "vision": {"errors", "config", "text"},
    "sampling": {"errors", "config", "presets", "model", "parallel", "cpu", "io", "text", "vision"},
    "guard": {"errors", "config", "presets", "model", "parallel", "cpu", "io", "text", "sampling"},
    "eval": {"errors", "config", "presets", "model", "parallel", "cpu", "io", "text", "sampling"},
    "training": {"errors", "config", "presets", "model", "parallel", "cpu", "io", "text", "sampling", "eval"},
    "aot": {"errors", "config", "presets", "model", "parallel", "cpu", "io", "text", "sampling", "training"},
}


def _wing(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_wings(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "llama_jax"
                                     else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "llama_jax" and len(parts) > 1:
                yield parts[1], node.lineno


def test_imports_run_one_way():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        wing = _wing(path)
        if wing not in ALLOWED:
            continue
        for target, line in _imported_wings(path):
            if target != wing and target not in ALLOWED[wing]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({wing}) imports llama_jax.{target}")
    assert not bad, "\n".join(bad)


def test_every_wing_is_listed():
    wings = {_wing(p) for p in ROOT.rglob("*.py")} - {"__init__", "convert", "data"}
    assert wings <= set(ALLOWED), sorted(wings - set(ALLOWED))


def test_every_error_derives_from_the_one_base():
    found = []
    for info in pkgutil.walk_packages([str(ROOT)], "llama_jax."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("llama_jax"):
                found.append(cls)
                assert issubclass(cls, LlamaJaxError), f"{cls.__module__}.{cls.__name__} is not a LlamaJaxError"
                assert cls.__module__ == "llama_jax.errors", f"{cls.__name__} is defined outside llama_jax/errors.py"
    assert len(set(found)) >= 10


def test_mesh_axis_names_are_spelled_in_parallel_only():
    """No module outside parallel/ (and the run config's mesh section) names a mesh axis: not as a quoted "fsdp"
    (a word with no other use), nor by indexing a mesh's shape with any axis name."""
    from llama_jax.parallel.sharding import MESH_AXES

    names = "|".join(MESH_AXES)
    spelled = re.compile(r"[\"']fsdp[\"']|shape(\.get\(|\[)[\"'](" + names + r")[\"']")
    allowed = {ROOT / "parallel" / "sharding.py", ROOT / "training" / "run_config.py"}
    bad = [f"{path.relative_to(ROOT.parent)}:{lineno}: {line.strip()}"
           for path in sorted(ROOT.rglob("*.py")) if path not in allowed
           for lineno, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line.split("#")[0])]
    assert not bad, "\n".join(bad)
