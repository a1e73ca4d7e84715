"""Where a result came from: library versions, the git state of parity, a hash of the model folder."""
from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHOLE_FILE_LIMIT = 64 << 20  # larger files are hashed by size + head + tail: a 24 GB checkpoint in seconds


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def git_state() -> str:
    """HEAD's short hash, with '-dirty' when the work tree differs. Outside a git checkout (a copied tree on a
    build machine) the PARITY_GIT environment variable names it; otherwise 'unknown'."""
    if os.environ.get("PARITY_GIT"):
        return os.environ["PARITY_GIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def folder_hash(root: str | Path) -> str:
    """sha256 over every file's relative path and content (head + tail + size for very large files)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        size = path.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with path.open("rb") as f:
            if size <= WHOLE_FILE_LIMIT:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    return {
        "torch_version": package_version("torch"),
        "diffusers_version": package_version("diffusers"),
        "transformers_version": package_version("transformers"),
        "parity_git": git_state(),
    }
