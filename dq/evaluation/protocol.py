"""What every evaluation number carries with it: the code version and the library versions."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import diffusers
import torch
import torchmetrics

import dq

REPO_ROOT = Path(__file__).resolve().parents[2]


def code_version() -> dict[str, Any]:
    """dq's version, and the git commit and dirty state of the checkout when there is one."""
    version: dict[str, Any] = {"dq": dq.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):  # no git binary, or a hung repository
        return version
    if commit.returncode == 0:
        version["git_commit"] = commit.stdout.strip()
        version["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    return version


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchmetrics": torchmetrics.__version__}
