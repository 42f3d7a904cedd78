"""The package installed the ordinary way (a wheel, not editable) works on its own: it carries
its rig-side scripts and needs nothing outside itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with llm-garage installed from its wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"  # a copy: building writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "llm_garage", source / "llm_garage",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("llm_garage-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)])
    return tmp, venv


def run(argv, **kwargs):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_installed_package_checks_an_inventory_away_from_the_source_tree(installed):
    tmp, venv = installed
    project = tmp / "project"
    (project / "inventory").mkdir(parents=True)
    shutil.copy(REPO / "inventory" / "garage.py", project / "inventory" / "garage.py")
    where = run([str(venv / "bin" / "python"), "-c",
                 "import llm_garage; print(llm_garage.__file__)"], cwd=project).stdout.strip()
    assert where.startswith(str(venv)), where  # not the source tree
    out = run([str(venv / "bin" / "llm-garage"), "check", "inventory/garage.py"], cwd=project)
    assert "inventory/garage.py: 2 rig(s) valid" in out.stdout
    assert "builds in /opt/llm-garage/builds/llama/<commit>-<flags>" in out.stdout


def test_installed_package_carries_every_rig_script_and_nothing_points_outside(installed):
    _tmp, venv = installed
    probe = ("import os, llm_garage; from llm_garage import layout\n"
             "root = os.path.dirname(llm_garage.__file__)\n"
             "for s in layout.RIG_SCRIPTS:\n"
             "    p = layout.script_source(s)\n"
             "    assert p.startswith(root) and os.access(p, os.R_OK), p\n"
             "print(' '.join(sorted(layout.RIG_SCRIPTS)))")
    out = run([str(venv / "bin" / "python"), "-c", probe], cwd="/")
    # every rig-side script of the source tree is installed with the package
    in_source = sorted(p.name for p in (REPO / "llm_garage" / "files").glob("garage-*"))
    assert len(in_source) >= 4 and out.stdout.split() == in_source
    package = Path(run([str(venv / "bin" / "python"), "-c",
                        "import llm_garage, os; print(os.path.dirname(llm_garage.__file__))"],
                       cwd="/").stdout.strip())
    # Only layout.py finds files from its own location (its own __file__, not an attribute of
    # another module), and only inside the package (above).
    using_file = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                        if re.search(r"(?<![.\w])__file__", p.read_text()))
    assert using_file == ["layout.py"]
