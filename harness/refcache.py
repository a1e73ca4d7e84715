"""Reference runs on disk, so that a second sweep of the same suite re-runs only the engine.

An entry holds what the sweep takes from one diffusers run: its Artifacts (step-0 denoiser inputs included) and the
reference's single-step output on those inputs. It is keyed by everything that determines that output: the model's
identity (the sweep's model hash, never its path, so machines sharing the cache over different mounts agree), the
run config the reference sees (derived from RunConfig, so a new sampling field joins the key by itself), the kind
of device (CPU instruction set and thread count, GPU model), the library versions and the source of our reference
runners. An upgrade of torch, diffusers or transformers, or an edit to reference/, misses by construction.

Safe to share between concurrent writers (several sweeps, Ray tasks on many machines): each entry is written to a
private temporary file in its final directory and published with os.replace, so a reader sees a whole entry or
none, and two writers of one key (which hold equal values) simply replace each other. Pruning deletes whole files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.api import Artifacts, RunConfig
from harness.provenance import package_version

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / ".cache" / "reference"
ENV_ROOT = "PARITY_REF_CACHE"  # shared storage for a fleet, without a flag on every command
FORMAT = 1  # bump when what an entry holds changes: old entries then miss instead of loading wrong
LIBRARIES = ("torch", "diffusers", "transformers", "numpy", "safetensors", "tokenizers", "sentencepiece")
# RunConfig fields the reference never sees: it runs the unquantized, uncompiled model on one device; the folder is
# named by its identity instead of its path.
NOT_KEYED = ("model_dir", "quant", "quant_ignored", "parallel", "optimize")
SUFFIX = ".pt"


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


def device_kind(device: str) -> str:
    """What decides a device's numerics: the CPU's vector instruction set and this process's intra-op thread count,
    or the GPU model and its compute capability (cuda:0 and cuda:1 of one host are the same kind).

    The thread count splits CPU reductions differently: measured on the smoke suite's tiny zoo model, diffusers
    decodes the same final latents into images up to 2 levels apart with 4 or 8 threads against 1 or 2 (bf16: 15-19%
    of the pixels; fp32: 1 pixel at 8 threads), so a cache shared by machines of other core counts would hand a
    bitwise-gated cell a reference it cannot equal. The inter-op pool does not change eager results (measured: 1 and
    4 equal)."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    return f"{device}:{torch.backends.cpu.get_cpu_capability()}:threads{torch.get_num_threads()}"


@lru_cache(maxsize=1)
def reference_code_hash() -> str:
    """Our runners around diffusers decide what is recorded (hooks, step-0 inputs): editing them misses."""
    h = hashlib.sha256()
    for path in sorted((REPO / "reference").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def key_fields(cfg: RunConfig, model_hash: str) -> dict:
    """Everything that determines the reference output of `cfg`, as a JSON-able dict."""
    run = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_KEYED}
    return {"format": FORMAT, "model": model_hash, "run": run, "device_kind": device_kind(cfg.device),
            "versions": {lib: package_version(lib) for lib in LIBRARIES}, "reference_code": reference_code_hash()}


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PruneResult:
    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int


class RefCache:
    """get/put reference runs under `root`; `hits`/`misses` count this process's lookups (for logs and tests)."""

    def __init__(self, root: str | Path | None = None, log: Callable[[str], None] = print):
        self.root = Path(root) if root is not None else default_root()
        self.log = log
        self.hits = self.misses = 0

    def __getstate__(self):  # travels to Ray tasks: the counters start afresh there, the log is re-bound
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def get(self, cfg: RunConfig, model_hash: str) -> Artifacts | None:
        """The cached run of `cfg` with extras["single_step"] set, or None. An unreadable or mismatched entry (a
        disk error, a hash collision) is a miss: it is reported and overwritten by the next put."""
        fields = key_fields(cfg, model_hash)
        path = self.path(cache_key(fields))
        try:
            entry = torch.load(path, weights_only=True)
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as e:  # a corrupt entry must never fail a cell or feed it wrong values
            self.log(f"  reference cache: ignoring unreadable {path}: {type(e).__name__}: {e}")
            self.misses += 1
            return None
        if entry.get("fields") != json.loads(json.dumps(fields, default=str)):
            self.log(f"  reference cache: {path} holds another key; ignoring it")
            self.misses += 1
            return None
        self.hits += 1
        try:
            os.utime(path)  # prune --older-than drops entries unused for that long, not merely old ones
        except OSError:
            pass  # a read-only shared cache still serves hits
        saved = entry["artifacts"]
        saved["images"] = saved["images"].numpy().astype(np.uint8)
        art = Artifacts(**saved)
        art.extras["single_step"] = entry["single_step"]
        return art

    def put(self, cfg: RunConfig, model_hash: str, art: Artifacts) -> Path:
        """Store `art` (with extras["single_step"]) atomically; returns the entry's path."""
        fields = key_fields(cfg, model_hash)
        path = self.path(cache_key(fields))
        saved = {f.name: getattr(art, f.name) for f in dataclasses.fields(art)}
        saved["extras"] = {k: v for k, v in art.extras.items() if k != "single_step"}
        saved["images"] = torch.from_numpy(np.ascontiguousarray(art.images))  # tensors only: loaded weights_only
        saved = _to_cpu(saved)
        entry = {"fields": json.loads(json.dumps(fields, default=str)), "artifacts": saved,
                 "single_step": art.extras["single_step"].detach().cpu()}
        path.parent.mkdir(parents=True, exist_ok=True)
        # A private name per writer in the final directory: os.replace is then a rename on one filesystem, and
        # concurrent writers of the same key never write into each other's file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def entries(self) -> list[Path]:
        return sorted(self.root.glob(f"*/*{SUFFIX}")) if self.root.is_dir() else []

    def prune(self, older_than_days: float | None = None, max_bytes: int | None = None,
              now: float | None = None) -> PruneResult:
        """Delete entries unused for more than `older_than_days`, then the least recently used ones until the
        cache holds at most `max_bytes`. Temporary files of writers that died long ago go too."""
        now = time.time() if now is None else now
        for tmp in self.root.glob("*/.*.tmp") if self.root.is_dir() else []:
            _remove_if(tmp, lambda st: now - st.st_mtime > 86400)  # a live writer finishes within a day
        stats = []
        for path in self.entries():
            try:
                stats.append((path, path.stat()))
            except FileNotFoundError:
                continue  # another pruner was first
        stats.sort(key=lambda ps: ps[1].st_mtime)  # oldest first
        removed = freed = 0
        keep = []
        for path, st in stats:
            if older_than_days is not None and now - st.st_mtime > older_than_days * 86400:
                removed, freed = removed + 1, freed + _remove(path, st)
            else:
                keep.append((path, st))
        total = sum(st.st_size for _, st in keep)
        while max_bytes is not None and keep and total > max_bytes:
            path, st = keep.pop(0)
            removed, freed, total = removed + 1, freed + _remove(path, st), total - st.st_size
        return PruneResult(removed, freed, len(keep), total)


def _remove(path: Path, st: os.stat_result) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return st.st_size


def _remove_if(path: Path, condition) -> None:
    try:
        if condition(path.stat()):
            path.unlink()
    except FileNotFoundError:
        pass


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5T' or a byte count."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with an optional unit K, M, G or T (e.g. 20G)") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value * SIZE_UNITS[unit])
