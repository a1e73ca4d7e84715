"""The reference cache: keyed by what determines the reference output, atomic under concurrent writers, prunable,
and in a sweep a hit gives the same report values without running diffusers."""
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.api import Artifacts, OptimizeSpec, RunConfig
from harness import backends, refcache
from harness.cli import main
from harness.refcache import RefCache, cache_key, key_fields, parse_size

TESTS = Path(__file__).parent
CFG = RunConfig(family="flux1", model_dir="/models/a", prompts=("a fox",), seed=0, steps=2, dtype="fp32")


def artifacts(fill: float, n: int = 4096) -> Artifacts:
    """Every tensor filled with `fill`, so a reader can tell which writer an entry came from, and whether it mixes."""
    t = lambda *shape: torch.full(shape, fill)  # noqa: E731
    art = Artifacts(initial_latents=t(1, n, 16), step_latents=t(2, 1, n, 16), step_outputs=t(2, 1, n, 16),
                    final_latents=t(1, n, 16), images=np.full((1, 1, 64, 64, 3), int(fill) % 256, np.uint8),
                    step0_inputs={"hidden_states": t(1, n, 16), "timestep": t(1)}, extras={"seconds": 1.5})
    art.extras["single_step"] = t(1, n, 16)
    return art


def fills(art: Artifacts) -> set[float]:
    tensors = [art.initial_latents, art.step_latents, art.step_outputs, art.final_latents,
               art.extras["single_step"], *art.step0_inputs.values()]
    return {float(v) for x in tensors for v in x.unique()} | {float(v) for v in np.unique(art.images)}


def sampled(**changes) -> RunConfig:
    return CFG.replace(sampling=dataclasses.replace(CFG.sampling, **changes))


def test_key_has_what_determines_the_reference_output(monkeypatch):
    base = cache_key(key_fields(CFG, "hash-a"))
    # The reference never runs quant or parallel, and a model is its identity, not its path.
    same = [CFG.replace(quant="fp8"), CFG.replace(parallel="ulysses2"), CFG.replace(model_dir="/mnt/b"),
            CFG.replace(optimize=OptimizeSpec(compile_blocks=True))]
    assert {cache_key(key_fields(c, "hash-a")) for c in same} == {base}
    changed = [CFG.replace(seed=1), CFG.replace(steps=3), CFG.replace(dtype="bf16"), sampled(guidance=4.0),
               CFG.replace(prompts=("a cat",)), sampled(negative_prompt="blurry"), CFG.replace(height=128)]
    keys = {cache_key(key_fields(c, "hash-a")) for c in changed} | {cache_key(key_fields(CFG, "hash-b"))}
    assert base not in keys and len(keys) == len(changed) + 1
    assert key_fields(CFG, "h")["device_kind"].startswith("cpu:")
    for lib in ("torch", "diffusers", "transformers"):  # an upgrade misses by construction
        real = refcache.package_version
        monkeypatch.setattr(refcache, "package_version", lambda name, lib=lib: "9.9" if name == lib else real(name))
        assert cache_key(key_fields(CFG, "hash-a")) != base
        monkeypatch.undo()
    monkeypatch.setattr(refcache, "reference_code_hash", lambda: "edited")  # so does an edit of reference/
    assert cache_key(key_fields(CFG, "hash-a")) != base


def test_round_trip_is_exact(tmp_path):
    cache = RefCache(tmp_path)
    assert cache.get(CFG, "h") is None and cache.misses == 1
    art = artifacts(0.0)
    art.final_latents = torch.randn(1, 64, 16)
    cache.put(CFG, "h", art)
    got = cache.get(CFG.replace(quant="fp8"), "h")
    assert cache.hits == 1
    assert torch.equal(got.final_latents, art.final_latents) and np.array_equal(got.images, art.images)
    assert got.images.dtype == np.uint8 and got.extras["seconds"] == 1.5 and set(got.extras) == set(art.extras)
    assert torch.equal(got.extras["single_step"], art.extras["single_step"])
    assert all(torch.equal(got.step0_inputs[k], v) for k, v in art.step0_inputs.items())
    assert cache.get(CFG, "other-model") is None


def test_an_entry_written_at_another_cpu_thread_count_misses(tmp_path):
    """CPU results depend on the intra-op thread count (refcache.device_kind): a shared cache filled by a machine with
    more cores must not serve this one."""
    mine = torch.get_num_threads()
    other = 1 if mine != 1 else 2
    cache = RefCache(tmp_path)
    torch.set_num_threads(other)
    try:
        cache.put(CFG, "h", artifacts(7.0))
    finally:
        torch.set_num_threads(mine)
    assert cache.get(CFG, "h") is None and cache.misses == 1
    cache.put(CFG, "h", artifacts(3.0))
    assert fills(cache.get(CFG, "h")) == {3.0} and cache.hits == 1
    assert len(cache.entries()) == 2  # two keys, neither overwrote the other


def _writer(root: str, fill: float, rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)  # the CPU thread count is part of the key: write the key the reader reads
    cache = RefCache(root)
    for _ in range(rounds):
        cache.put(CFG, "h", artifacts(fill, n=65536))  # ~30 MB an entry: a write takes a while


def test_two_concurrent_writers_never_show_a_reader_a_torn_entry(tmp_path, start_ranks):
    """Two processes write the same key with different payloads while this one reads: every read is one
    writer's whole entry (never unreadable, never a mix), and no temporary file is left. The writers fork from
    the session's fork server (conftest.start_ranks), which has imported torch and the engine already: spawned,
    each paid those imports first (~10 s on 2 cores) and then raced this reader as they do now."""
    forkserver = multiprocessing.get_context("forkserver")
    writers = [forkserver.Process(target=_writer, args=(str(tmp_path), fill, 6, torch.get_num_threads()))
               for fill in (1.0, 2.0)]
    for w in writers:
        w.start()
    log: list[str] = []
    reader = RefCache(tmp_path, log=log.append)
    seen = []
    while any(w.is_alive() for w in writers):
        art = reader.get(CFG, "h")
        if art is not None:
            seen.append(fills(art))
        time.sleep(0.01)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    final = reader.get(CFG, "h")
    assert final is not None
    seen.append(fills(final))
    assert not log, log  # no read ever found an unreadable or foreign entry
    assert all(s in ({1.0}, {2.0}) for s in seen), seen
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_writer_that_dies_mid_write_leaves_the_old_entry(tmp_path, monkeypatch):
    cache = RefCache(tmp_path)
    cache.put(CFG, "h", artifacts(1.0))

    def dies_half_way(obj, path):
        Path(path).write_bytes(b"half an entry")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(refcache.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.put(CFG, "h", artifacts(2.0))
    monkeypatch.undo()
    assert fills(cache.get(CFG, "h")) == {1.0}
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_unreadable_entry_is_a_miss_not_an_error(tmp_path):
    log: list[str] = []
    cache = RefCache(tmp_path, log=log.append)
    path = cache.put(CFG, "h", artifacts(1.0))
    path.write_bytes(path.read_bytes()[:1000])  # truncated by a copy that was not atomic
    assert cache.get(CFG, "h") is None and "unreadable" in log[0]
    cache.put(CFG, "h", artifacts(1.0))
    assert cache.get(CFG, "h") is not None


def test_prune_by_age_then_size(tmp_path):
    cache = RefCache(tmp_path)
    now = time.time()
    paths = [cache.put(CFG.replace(seed=s), "h", artifacts(float(s))) for s in range(4)]
    for age_days, path in zip((10, 3, 2, 1), paths):
        os.utime(path, (now - age_days * 86400,) * 2)
    result = cache.prune(older_than_days=5, now=now)
    assert result.removed == 1 and not paths[0].exists() and result.kept == 3
    cache.get(CFG.replace(seed=1), "h")  # a hit makes an entry recent: size pruning drops it last
    size = paths[1].stat().st_size
    result = cache.prune(max_bytes=size + size // 2)
    assert result.kept == 1 and paths[1].exists() and not paths[2].exists() and not paths[3].exists()


def test_cache_prune_cli(tmp_path):
    cache = RefCache(tmp_path)
    path = cache.put(CFG, "h", artifacts(1.0))
    assert main(["cache", "prune", "--dir", str(tmp_path)]) == 2  # nothing to prune by: an error
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-size", "lots"]) == 2
    assert main(["cache", "prune", "--dir", str(tmp_path), "--older-than", "1"]) == 0 and path.exists()
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-size", "0"]) == 0 and not path.exists()


def test_parse_size():
    assert parse_size("20G") == 20 << 30 and parse_size("1.5GiB") == 3 << 29 and parse_size("512") == 512
    with pytest.raises(ValueError, match="unit"):
        parse_size("12X")


def _rows(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "results.parquet").drop(columns=["run_id"])


@pytest.mark.slow
def test_a_cache_hit_gives_the_same_report_without_running_diffusers(tmp_path, zoo_root, monkeypatch):
    cache = tmp_path / "cache"

    def sweep(run_id):
        code = main(["sweep", "--suite", str(TESTS / "data" / "tiny_suite.toml"), "--out", str(tmp_path),
                     "--run-id", run_id, "--zoo-root", str(zoo_root), "--ref-cache", str(cache)])
        return code, _rows(tmp_path / run_id)

    code, first = sweep("first")
    assert code == 0 and len(RefCache(cache).entries()) == 1

    def no_diffusers(cfg):
        raise RuntimeError("diffusers ran although the reference cache holds this run")

    monkeypatch.setitem(backends.BACKENDS, "diffusers", no_diffusers)
    code, second = sweep("second")
    assert code == 0  # a bypassed cache would run diffusers: error rows, gate fails
    pd.testing.assert_frame_equal(first, second, check_exact=True)

    # The values do come from the entry: altered reference latents change the engine_vs_reference rows.
    entry = RefCache(cache).entries()[0]
    saved = torch.load(entry, weights_only=True)
    saved["artifacts"]["final_latents"] += 0.05 * torch.randn_like(saved["artifacts"]["final_latents"])
    torch.save(saved, entry)
    code, tampered = sweep("tampered")
    def engine_rows(frame):  # the negative controls compare the reference with itself plus noise: unchanged
        return frame[(frame.metric == "final_latent_cosine") & (frame.comparison == "engine_vs_reference")].value.values

    assert (engine_rows(tampered) < engine_rows(first)).all()

    # A library upgrade misses: diffusers (here refusing) must run again.
    real = refcache.package_version
    monkeypatch.setattr(refcache, "package_version", lambda name: "99.0" if name == "diffusers" else real(name))
    code, upgraded = sweep("upgraded")
    assert code == 1 and upgraded.reason.str.contains("diffusers ran although").any()
