"""API conventions, checked for every public function (new ones included automatically)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
from anndata import AnnData

import sc_vi_ext as sv

TL = [getattr(sv.tl, name) for name in sv.tl.__all__]
PL = [getattr(sv.pl, name) for name in sv.pl.__all__]
# tl functions that only read adata and therefore need no ``copy`` (none so far)
TL_READ_ONLY: set[str] = set()


def _params(func):
    return list(inspect.signature(func).parameters.values())


def test_public_names_exist():
    for mod in (sv, sv.tl, sv.pl, sv.datasets):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"
    assert TL and PL


def _id(func) -> str:
    return f"{func.__module__.split('.')[1]}.{func.__name__}"


@pytest.mark.parametrize("func", TL + PL, ids=_id)
def test_sig_conventions(func):
    """scanpy's rule (its tests/test_package_structure.py): ``adata`` first and positional, the rest keyword-only."""
    params = _params(func)
    assert params[0].name == "adata"
    assert params[0].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params[0].default is inspect.Parameter.empty
    for p in params[1:]:
        assert p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD), (
            f"{func.__name__}: {p.name} must be keyword-only"
        )


def _documented_params(doc: str) -> list[str]:
    """Names in the numpydoc Parameters section: the unindented lines (``a, b`` names both)."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Parameters") + 2
    names = []
    for line in lines[start:]:
        if line in ("Returns", "Yields", "Raises", "See Also", "Notes", "Examples"):
            break
        if line and not line[0].isspace():
            names += [n.strip().lstrip("*") for n in line.split(",")]
    return names


@pytest.mark.parametrize("func", TL + PL, ids=_id)
def test_parameters_documented(func):
    """Every parameter has its own top-level entry in the Parameters section (numpydoc)."""
    assert func.__doc__, f"{func.__name__} has no docstring"
    assert "{" not in func.__doc__.split("Returns")[0], "unformatted {field} in the docstring"
    documented = _documented_params(func.__doc__)
    names = [p.name for p in _params(func)]
    missing = [n for n in names if n not in documented]
    assert not missing, f"{func.__name__}: not documented at the top level of Parameters: {missing}"
    unknown = [n for n in documented if n not in names]
    assert not unknown, f"{func.__name__}: documents parameters it does not have: {unknown}"


@pytest.mark.parametrize("func", TL, ids=_id)
def test_tl_has_copy(func):
    """``copy: bool = False``, and the return value says what ``copy`` does: ``AnnData | None``."""
    if func.__name__ in TL_READ_ONLY:
        pytest.skip("read-only tool")
    sig = inspect.signature(func, eval_str=True)
    params = sig.parameters
    assert "copy" in params, f"tl.{func.__name__} writes to adata and needs copy="
    assert params["copy"].kind == inspect.Parameter.KEYWORD_ONLY
    assert params["copy"].default is False
    assert params["copy"].annotation is bool
    assert sig.return_annotation == (AnnData | None)
    assert params["adata"].annotation is AnnData


@pytest.mark.parametrize("func", PL, ids=_id)
def test_pl_has_ax_show_return_fig(func):
    params = inspect.signature(func, eval_str=True).parameters
    for name in ("ax", "show", "return_fig"):
        assert params[name].kind == inspect.Parameter.KEYWORD_ONLY, name
    assert params["ax"].default is None
    assert params["show"].default is None
    assert params["show"].annotation == (bool | None)
    assert params["return_fig"].default is False
    assert params["return_fig"].annotation is bool
    assert params["adata"].annotation is AnnData
    assert "copy" not in params  # plots do not write to adata (checked by behaviour in test_plot_conventions.py)


def test_tl_pl_in_all():
    """Nothing public is missing from __all__ (so the checks above see every function)."""
    for mod in (sv.tl, sv.pl):
        public = {n for n, v in vars(mod).items() if inspect.isfunction(v) and not n.startswith("_")}
        assert public <= set(mod.__all__), public - set(mod.__all__)


def _internal_imports(pkg_dir) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (at the top or inside functions)."""
    import ast
    from pathlib import Path

    root = Path(pkg_dir).parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in Path(pkg_dir).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        seen = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                seen |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                seen |= {n for n in names if n in modules}
        graph[name] = seen & set(modules) - {name}
    return graph


def test_the_tools_do_not_import_each_other_in_a_circle():
    """The modules of ``sc_vi_ext.tl`` form no import cycle (imports inside functions included):
    each shared name has one home below the tools that use it."""
    from pathlib import Path

    graph = {m: {t for t in deps if t.startswith("sc_vi_ext.tl.")}
             for m, deps in _internal_imports(Path(sv.__file__).parent).items() if m.startswith("sc_vi_ext.tl.")}
    assert "sc_vi_ext.tl._shared" in graph and graph["sc_vi_ext.tl._ppc"]
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize(
    ("code", "env", "expected"),
    [
        ("import sc_vi_ext", {}, "10000"),  # imported before torch: the shorter spin-wait
        ("import sc_vi_ext", {"GOMP_SPINCOUNT": "77"}, "77"),  # the user's own value is kept
        ("import sc_vi_ext", {"SC_VI_EXT_KEEP_OPENMP": "1"}, "unset"),
        ("import torch, sc_vi_ext", {}, "unset"),  # too late for libgomp: the environment is left alone
    ],
)
def test_openmp_spin_wait_set_only_before_torch(code, env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "SC_VI_EXT_KEEP_OPENMP")}
    out = subprocess.run([sys.executable, "-c", f"{code}; import os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"],
                         env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
