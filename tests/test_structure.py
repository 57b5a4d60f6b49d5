"""The package's structure as the redesign promises it: no import circle between sdsopt's modules (type-only
imports included), the lab (``sdsopt.lab``) one floor above the library, which never imports it, no module outside
``optim.py`` reading the optimizer's private attributes, and every maths citation of the code resolving to
docs/math.md."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sdsopt"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → the sdsopt modules it imports (``from . import x`` names the submodule ``x``, not the package)."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
                edges[mod] |= subs if subs else ({target} & set(modules))
            elif isinstance(node, ast.Import):
                edges[mod] |= {a.name for a in node.names} & set(modules)
    return edges


def test_no_import_circle():
    edges = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


LAB = "sdsopt.lab"
ALIASES = {"sdsopt.ablate"}  # the lab's former CLI module, a re-export of sdsopt.lab.cli.main


def _in_lab(module: str) -> bool:
    return module == LAB or module.startswith(LAB + ".")


def test_the_library_never_imports_the_lab():
    edges = _imports()
    upward = {m: sorted(filter(_in_lab, targets)) for m, targets in edges.items()
              if not _in_lab(m) and m not in ALIASES}
    assert not {m: t for m, t in upward.items() if t}, upward


def test_import_sdsopt_loads_neither_the_lab_nor_its_dependencies():
    """In a fresh interpreter: ``import sdsopt`` (and the optimizer's module) leaves the lab, matplotlib and
    transformers unloaded."""
    code = ("import sys, sdsopt, sdsopt.optim; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'transformers') "
            "or m == 'sdsopt.lab' or m.startswith('sdsopt.lab.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.stdout.strip() == "[]", done.stdout


def test_no_private_reads_of_the_optimizer_outside_optim():
    pattern = re.compile(r"\b(?:opt|optimizer|self\.opt)\._[a-z]")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PKG.rglob("*.py") if p.name != "optim.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


EQUATION = re.compile(r"(?<![\w.)\]`])\(([A-Z]|\d+\.\d+'?)\)|\bequations? \(?([A-Z]|\d+\.\d+'?)\b")
"""An equation cited: ``(2.9)``, ``(3.1')``, a letter label ``(R)`` (not a call such as ``P(K)``), ``equation R``."""
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
PROPERTY = re.compile(r"(?<![\w])(P\d+)\b")


def test_every_maths_citation_resolves_to_docs_math():
    """Every equation, section and property that sdsopt/ cites (``(2.9)``, ``(R)``, ``equation R``, ``§8``,
    ``P12``) exists in docs/math.md."""
    math = (ROOT / "docs" / "math.md").read_text()
    equations = set(re.findall(r"^\s*\((\d+\.\d+'?)\)", math, re.M)) | set(re.findall(r"\*\*\((\d+\.\d+)\)", math))
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", math, re.M))
    properties = set(re.findall(r"^- \*\*(P\d+)\*\*", math, re.M))
    assert properties == {f"P{i}" for i in range(1, 14)}, properties  # (the parser still finds every one)
    bad = []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        where = path.relative_to(ROOT)
        assert "MATH" not in text, f"{where} cites MATH.md, which the package does not ship"
        bad += [f"{where}: ({a or b})" for a, b in EQUATION.findall(text) if (a or b) not in equations]
        bad += [f"{where}: §{sec}" for sec in SECTION.findall(text) if sec not in sections]
        bad += [f"{where}: {prop}" for prop in PROPERTY.findall(text) if prop not in properties]
    assert not bad, bad


MAX_FUNCTION_LINES = 80


def test_no_function_of_the_library_over_80_lines():
    """Every function and method of sdsopt/ (sdsopt/lab/, research code, aside) has at most
    :data:`MAX_FUNCTION_LINES` lines of body (its docstring included)."""
    long = []
    for path in PKG.rglob("*.py"):
        if "lab" in path.relative_to(PKG).parts[:-1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.body[-1].end_lineno - node.body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


MAX_OPTIM_LINES = 400


def test_the_optimizer_module_stays_thin():
    """``sdsopt/optim.py`` (the optimizer's orchestration: validation, pairing, geometry and the start live in their
    own modules) has at most :data:`MAX_OPTIM_LINES` lines."""
    lines = len((PKG / "optim.py").read_text().splitlines())
    assert lines <= MAX_OPTIM_LINES, f"sdsopt/optim.py has {lines} lines (> {MAX_OPTIM_LINES}): move code out"
