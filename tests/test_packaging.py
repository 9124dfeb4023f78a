"""backends/ and validation/ install inside the sae_ref namespace, from a wheel and editable.

Each check imports the project in a fresh interpreter started with ``-S`` (no .pth files are
processed, so the development install cannot answer for the one under test) from an empty
directory (so the source tree cannot shadow it).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = sysconfig.get_paths()["purelib"]  # numpy, scipy, array-api-compat live here
PROBE = (
    "import sys, site\n"
    "{setup}\n"
    "sys.path.append({site!r})\n"
    "import sae_ref, sae_ref.backends, sae_ref.validation, sae_ref.validation.strategies\n"
    "print(sae_ref.backends.__file__)\n"
    "print(sae_ref.validation.__file__)\n"
    "import importlib.util\n"
    "print(importlib.util.find_spec('backends'), importlib.util.find_spec('validation'))\n"
)


def _pip(*args, cwd):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def _probe(setup: str, cwd: Path) -> list[str]:
    code = PROBE.format(setup=setup, site=SITE)
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()


@pytest.mark.slow
def test_wheel_maps_backends_and_validation_into_sae_ref(tmp_path):
    _pip("wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("sae_ref-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sae_ref/backends/__init__.py" in names
    assert "sae_ref/validation/__init__.py" in names
    assert not any(n.startswith(("backends/", "validation/")) for n in names), names
    target = tmp_path / "target"
    _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _probe(f"sys.path.insert(0, {str(target)!r})", empty)
    assert lines[0].startswith(str(target / "sae_ref" / "backends"))
    assert lines[1].startswith(str(target / "sae_ref" / "validation"))
    assert lines[2] == "None None", "backends/validation must not be top-level modules"


@pytest.mark.slow
def test_editable_install_maps_backends_and_validation_into_sae_ref(tmp_path):
    prefix = tmp_path / "prefix"
    _pip("install", "--no-deps", "--no-build-isolation", "--ignore-installed", "--prefix", str(prefix), "-e", str(ROOT), cwd=tmp_path)
    (site_dir,) = prefix.glob("lib/python*/site-packages")
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _probe(f"site.addsitedir({str(site_dir)!r})", empty)
    assert lines[0] == str(ROOT / "backends" / "__init__.py")
    assert lines[1] == str(ROOT / "validation" / "__init__.py")
    assert lines[2] == "None None"
