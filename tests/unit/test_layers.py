"""Imports point down the layers (README: datasets -> ops -> catalog -> sources -> storage).

Checked statically over every import in ``src/neurocube`` (function-level ones too), and
in fresh processes for the modules that used to import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SRC = Path(__file__).parents[2] / "src"

#: Layers, lowest first (DESIGN: datasets -> ops -> catalog -> sources -> storage; io/ writers
#: and the cache beside sources, above the formats they write). A module may import its own
#: layer or a lower one. Modules not listed (the API: accessor, loading, backend, cli, ...)
#: are the top.
LAYERS: dict[str, int] = {
    "neurocube": 0,  # the package root (``__version__``); importing it is always cheap
    "neurocube.errors": 0,
    "neurocube.config": 0,
    "neurocube.storage": 1,
    "neurocube.progress": 1,
    "neurocube.sources": 2,
    "neurocube.io": 3,
    "neurocube.caching": 3,
    "neurocube.catalog": 4,
    "neurocube.ops": 5,
    "neurocube.datasets": 6,
}
TOP = 9

#: Known upward imports, each with its reason. Keep this short.
ALLOWED_UP: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, str | None, int]]:
    """Every import of a neurocube module in src (function-level ones too)."""
    found = []
    for path in sorted((SRC / "neurocube").rglob("*.py")):
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] == "neurocube":
                    for alias in node.names:
                        sub = SRC.joinpath(*module.split("."), alias.name)
                        if sub.with_suffix(".py").is_file() or sub.is_dir():
                            found.append((me, f"{module}.{alias.name}", None, node.lineno))
                        else:
                            found.append((me, module, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "neurocube":
                        found.append((me, alias.name, None, node.lineno))
    return found


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len,
               default=None)
    if best is None or (best == "neurocube" and module != "neurocube"):
        return TOP
    return LAYERS[best]


def test_imports_point_down_the_layers():
    def importer(me: str) -> int:
        return TOP if me == "neurocube" else _layer(me)  # the root package is the API

    up = [
        f"{me}:{line} imports {target} (layer {_layer(target)} above {importer(me)})"
        for me, target, _, line in _imports()
        if _layer(target) > importer(me) and (me, target) not in ALLOWED_UP
    ]
    assert not up, "imports that point up a layer:\n" + "\n".join(up)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{me}:{line} imports {name} from {target}"
        for me, target, name, line in _imports()
        if name is not None and name.startswith("_") and not name.startswith("__")
        and target != me
    ]
    assert not private, "private names used across modules:\n" + "\n".join(private)


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pushdown_and_direct_load_work_without_the_nifti_reader():
    """The graph optimization and the direct loader are below the reader: they never import it.

    The reader registers its array type and its whole-array reads with them;
    using them (here: optimizing a plain Dask graph) pulls nothing of it in.
    """
    code = (
        "import sys, dask.array as da; "
        "from neurocube.sources import pushdown, nifti_load; "
        "x = da.ones(10, chunks=5)[2:7]; "
        "pushdown.optimize(x.__dask_graph__(), x.__dask_keys__()); "
        "print(nifti_load.direct_load(x), 'neurocube.sources.nifti' in sys.modules)"
    )
    assert _run(code) == "None False"


@pytest.mark.parametrize("xarray_first", [False, True])
def test_open_nifti_results_have_the_accessor_without_importing_it(tmp_path, xarray_first):
    """``ds.neuro`` on an ``open_nifti`` result comes from ``import neurocube``, not the reader.

    The reader (a source, below the API) does not import ``neurocube.accessor``;
    the package's import hook registers it when xarray is imported, before or
    after the reader. The fresh process never imports the accessor itself.
    """
    path = tmp_path / "betas.nii"
    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(path))
    code = (
        ("import xarray; " if xarray_first else "")
        + "import numpy as np; from neurocube.sources.nifti import open_nifti; "
        + f"ds = open_nifti({str(path)!r}); "
        + "loaded = ds.neuro.load(); "
        + "print(type(loaded).__name__, callable(ds.data.neuro.to_nifti), "
        + "float(np.asarray(loaded.data).sum()))"
    )
    assert _run(code) == f"Dataset True {float(data.sum())}"


def test_the_cache_package_does_not_import_the_accessor_yet_ds_neuro_works():
    """``neurocube.caching`` sits below ``neurocube.accessor`` (which calls into it)."""
    # without neurocube's xarray import hook, importing the cache package loads no accessor
    code = (
        "import sys, neurocube; neurocube._remove_hook(); import neurocube.caching; "
        "print('neurocube.accessor' in sys.modules)"
    )
    assert _run(code) == "False"
    # with it (any normal import), ds.neuro is there all the same
    code = (
        "from neurocube.caching import cache; import xarray as xr; "
        "print(callable(xr.Dataset().neuro.cache))"
    )
    assert _run(code) == "True"


def test_no_import_cycles_between_modules():
    """No two modules import each other, even through function-level imports.

    Importing ``a.b.c`` runs the ``a.b`` package too, so that counts as an import
    of ``a.b`` (except from inside ``a.b``, whose facade re-exports its modules).
    """
    graph: dict[str, set[str]] = {}
    for me, target, _, _ in _imports():
        parts = target.split(".")
        for k in range(2, len(parts) + 1):
            dep = ".".join(parts[:k])
            if dep != me and not me.startswith(dep + "."):
                graph.setdefault(me, set()).add(dep)
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"
