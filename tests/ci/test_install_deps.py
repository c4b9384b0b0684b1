"""The one install script: a package it cannot install is named in one sentence, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "install-deps"
BASH = shutil.which("bash") or "/bin/bash"


def _bin_without(tmp_path: Path, *missing: str) -> Path:
    """A PATH directory holding the tools the script looks for, except `missing` (and apt-get)."""
    tools = [
        "dirname", "id", "mktemp", "tail", "grep", "dpkg",
        "mariadb", "mariadb-binlog", "mariadb-dump", "zstd", "redis-server", "chromium",
        "pdftotext", "mydumper", "myloader", "mariabackup", "mbstream", "gcc",
    ]  # fmt: skip
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if tool not in missing and found:
            (bindir / tool).symlink_to(found)
    return bindir


def test_a_missing_package_that_cannot_be_installed_is_named_in_one_sentence(tmp_path):
    bindir = _bin_without(tmp_path, "pdftotext")
    result = subprocess.run(
        [BASH, str(SCRIPT), "test"],
        env={"PATH": str(bindir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "poppler-utils" in lines[0]
    assert "apt-get install" in lines[0]
    assert "Traceback" not in result.stderr


def test_bench_also_needs_mydumper(tmp_path):
    bindir = _bin_without(tmp_path, "mydumper", "myloader")
    result = subprocess.run(
        [BASH, str(SCRIPT), "bench"],
        env={"PATH": str(bindir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    # One package named once, though two of its commands (mydumper, myloader) are missing.
    assert "the Debian packages mydumper: run 'sudo apt-get install mydumper'" in result.stderr


def test_an_unknown_purpose_is_refused(tmp_path):
    result = subprocess.run(
        [BASH, str(SCRIPT), "deploy"],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown purpose 'deploy'" in result.stderr
