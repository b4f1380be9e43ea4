"""The package's shape is a contract: layers import downwards only, and the runtime never needs torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_contracts_hold():
    """pyproject's [tool.importlinter] contracts: the layer order and the torch-free runtime."""
    r = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_contract_catches_an_upward_import(tmp_path):
    """The layers contract is live: a module of a low layer importing a higher one breaks it."""
    src = tmp_path / "src"
    pkg = src / "edgekit"
    for sub in ("", "checkpoint", "export"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "checkpoint" / "load.py").write_text("import edgekit.export.graph\n")
    (pkg / "export" / "graph.py").write_text("")
    cfg = tmp_path / ".importlinter"
    cfg.write_text(
        "[importlinter]\nroot_package = edgekit\n\n[importlinter:contract:layers]\nname = layers\ntype = layers\n"
        "layers =\n    edgekit.export\n    edgekit.checkpoint\n"
    )
    r = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(cfg)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode != 0 and "edgekit.checkpoint.load -> edgekit.export.graph" in r.stdout


def test_modules_stay_small():
    """Flat inside: no module over 400 lines (the rule the structure issue set)."""
    big = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "edgekit").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not big, big


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in (ROOT / "edgekit").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)} has no 'May import' line in its docstring"
