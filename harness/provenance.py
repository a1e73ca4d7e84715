"""Where a result came from: library versions, the git state of parity, the model's identity."""
from __future__ import annotations

import hashlib
import json
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


# Keys libraries (and our zoo's marker) stamp into the JSON they save: they name the writer's version, or where
# the folder was loaded from, never the model. Dropped before hashing so an upgrade does not change a model's identity.
VERSION_STAMPS = frozenset({"_diffusers_version", "transformers_version", "torch_version", "diffusers_version",
                            "_name_or_path", "_commit_hash"})
# Files that never reach the numerics: documentation and licences (hidden files and folders, such as .gitattributes
# or a download's .cache/, are skipped too).
NOT_MODEL = ("README", "LICENSE", "NOTICE")
TENSOR_SAMPLE = 1 << 16  # bytes from each end of a tensor hashed when a file is over WHOLE_FILE_LIMIT


def model_hash(root: str | Path) -> str:
    """The model's identity: sha256 over what determines its numbers, not over the folder's bytes.

    - safetensors: every tensor's name, dtype, shape and data (the header's `__metadata__` is the writer's, not the
      model's); in files over WHOLE_FILE_LIMIT, each tensor's size plus its first and last TENSOR_SAMPLE bytes.
    - JSON (configs, tokenizers, indexes): parsed, VERSION_STAMPS removed at every level, re-serialized canonically.
    - other files (tokenizer models, vocabularies, pickles): their bytes (head + tail + size when very large).
    Keys goldens, caches and report rows: the same weights and configs written by other library versions hash the
    same; a changed weight or config value does not."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.name.startswith(NOT_MODEL) or "/." in f"/{rel}" or rel.endswith(".md"):
            continue
        h.update(rel.encode() + b"\0")
        if path.suffix == ".safetensors":
            _hash_safetensors(h, path)
        elif path.suffix == ".json":
            h.update(json.dumps(_without_stamps(json.loads(path.read_text())), sort_keys=True).encode())
        else:
            _hash_bytes(h, path)
    return h.hexdigest()[:16]


def _without_stamps(value):
    if isinstance(value, dict):
        return {k: _without_stamps(v) for k, v in value.items() if k not in VERSION_STAMPS}
    if isinstance(value, list):
        return [_without_stamps(v) for v in value]
    return value


def _hash_safetensors(h, path: Path) -> None:
    """safetensors layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the data. Tensors are hashed in name order, so a rewrite that orders them differently hashes the same."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        for name in sorted(header):
            entry = header[name]
            begin, end = entry["data_offsets"]
            h.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            f.seek(base + begin)
            if size <= WHOLE_FILE_LIMIT or end - begin <= 2 * TENSOR_SAMPLE:
                h.update(f.read(end - begin))
            else:
                h.update(f.read(TENSOR_SAMPLE))
                f.seek(base + end - TENSOR_SAMPLE)
                h.update(f.read(TENSOR_SAMPLE))


def _hash_bytes(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), 2)
            h.update(f.read())


def versions() -> dict[str, str]:
    return {
        "torch_version": package_version("torch"),
        "diffusers_version": package_version("diffusers"),
        "transformers_version": package_version("transformers"),
        "parity_git": git_state(),
    }
