"""What the README and the packaging promise a new user: the sample as described, the tools it names
installed in the venv, a build without deprecation warnings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.command_line import ROOT, SAMPLE, Place

NUMBERS = {"Nineteen": 19, "Twenty": 20}


def test_the_sample_readme_counts_the_sample() -> None:
    words = re.findall(r"\b(" + "|".join(NUMBERS) + r") real DICOM", (SAMPLE / "README.md").read_text())
    assert [NUMBERS[word] for word in words] == [len(list(SAMPLE.rglob("*.dcm")))]


def test_the_license_is_an_spdx_expression() -> None:
    """setuptools warns that a table for project.license is deprecated (a string since 77)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in " ".join(project["build-system"]["requires"])


def test_the_package_built_for_workers_holds_every_module(tmp_path: Path) -> None:
    """Dataflow workers and the template's image install the built package, not this checkout: a
    subpackage or data file the build leaves out (pipelines/options, dicomlib/flatten, the profile
    table) would be missing there."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    source = tmp_path / "source"  # a copy: a build/ directory left in the checkout could hide a gap
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in (pattern.rstrip("*") for pattern in found["include"]):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*wheel_command, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("*.whl")
    built = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        str(path.relative_to(ROOT))
        for pattern in found["include"]
        for path in (ROOT / pattern.rstrip("*")).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sources and sources <= built, sorted(sources - built)


def test_the_readme_names_what_a_fresh_machine_needs() -> None:
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for needed in ("Python 3.11", "python3-venv", "make", ". .venv/bin/activate"):
        assert needed in quick_start


def test_the_duckdb_command_of_the_readme_is_in_the_venv(tmp_path: Path) -> None:
    """`cd metadata && duckdb -c "SELECT count(*) FROM ($(cat view.sql))"`, as the README says."""
    place = Place(tmp_path)
    result = place.run(
        "script",
        "import_dicom",
        f"--input={SAMPLE}/**.dcm",
        "--store=store",
        "--metadata_destination=metadata",
    )
    assert result.status == 0, result.stderr
    duckdb = Path(sys.executable).parent / "duckdb"
    counted = subprocess.run(
        ["bash", "-c", f'{duckdb} -noheader -list -c "SELECT count(*) FROM ($(cat view.sql))"'],
        cwd=place.cwd / "metadata",
        capture_output=True,
        text=True,
        check=True,
    )
    assert counted.stdout.strip() == "19"
