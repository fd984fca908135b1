"""pyproject.toml against the tree: a non-editable install (a wheel, the Docker images) holds
every subpackage and every data file the code opens at run time. CI installs the checkout in
editable mode, where a missing entry would go unnoticed until a user's `pip install .`."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

from autoopt.calibration.profile import PROFILES_DIR  # noqa: E402
from autoopt.engine.traces import SHIPPED_TRACES, TRACE_DIR  # noqa: E402
from autoopt.policies import SHIPPED_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_of(folder: Path) -> str:
    return ".".join(("autoopt", *folder.relative_to(ROOT).parts))


def _subpackages(folder: Path) -> set[str]:
    """The folder's package and, recursively, every child folder that has an __init__.py."""
    found = {_package_of(folder)}
    for child in folder.iterdir():
        if child.is_dir() and (child / "__init__.py").is_file():
            found |= _subpackages(child)
    return found


def _shipped(path: Path, package_data: dict[str, list[str]]) -> bool:
    """Whether a package-data glob of the package whose folder holds `path` matches it (setuptools
    matches globs against the path relative to the package's folder, segment by segment)."""
    for package, globs in package_data.items():
        folder = ROOT.joinpath(*package.split(".")[1:])
        if not path.is_relative_to(folder):
            continue
        parts = path.relative_to(folder).parts
        for glob in globs:
            pattern = glob.split("/")
            if len(pattern) == len(parts) and all(
                fnmatch.fnmatchcase(p, g) for p, g in zip(parts, pattern, strict=True)
            ):
                return True
    return False


def test_every_folder_with_an_init_is_a_listed_package_and_nothing_else_is() -> None:
    assert set(_setuptools()["packages"]) == _subpackages(ROOT)


def test_the_data_files_the_code_opens_are_package_data() -> None:
    data = _setuptools()["package-data"]
    needed = [TRACE_DIR / desc.split(":", 1)[0] for desc in SHIPPED_TRACES.values()]
    needed.append(TRACE_DIR / "SOURCES.md")  # the traces' attribution travels with them
    needed += sorted(PROFILES_DIR.glob("*.json"))
    needed += sorted(p for p in SHIPPED_DIR.rglob("*") if p.is_file())
    needed += sorted((ROOT / "training" / "configs").glob("*.yaml"))
    assert len(needed) > 10 and all(p.is_file() for p in needed)
    missing = [str(p.relative_to(ROOT)) for p in needed if not _shipped(p, data)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_the_check_itself_tells_a_shipped_file_from_one_left_out() -> None:
    data = {"autoopt.engine.traces": ["*.csv"]}
    assert _shipped(TRACE_DIR / "azure_conv_2023_excerpt.csv", data)
    assert not _shipped(TRACE_DIR / "mooncake_conv_excerpt.jsonl", data)
    assert not _shipped(PROFILES_DIR / "cpu-tiny.json", {"autoopt.calibration": ["*.json"]})  # one folder down
