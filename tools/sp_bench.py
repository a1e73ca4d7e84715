"""Sequence-parallel speed-ups in one CSV: `parity bench` once per config (one torchrun per degree), every config's
median forward against the 1-GPU engine measured in the same session on the same machine.

    python tools/sp_bench.py --out reports/sp-bench                  # every config below, then the table
    python tools/sp_bench.py --out reports/sp-bench --only sp1 ulysses2   # a subset (resumable: done ones are kept)

Each config runs `python -m torch.distributed.run --standalone --nproc-per-node N -m harness.cli bench --family F
--parallel P --modes M --height H --width H --out OUT/runs/<config>` (rank 0 writes bench-<P>.csv there); configs
already in OUT/runs are skipped, so a session cut at the device's per-command limit goes on where it stopped. The
`+ringtext` configs also cut the text across a ring's ranks (SequenceParallelTransformer.shard_text_with_ring),
through tools/sp_run.py, to measure what sharding the text saves there before it becomes the default.
OUT/sp_bench.csv: one row per config with median_ms, speedup over the sp1 row of the same height, cosine_vs_first,
device, versions. Exit 1 if a config failed (the others still run and are written)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def world(parallel: str) -> int:
    sys.path.insert(0, str(REPO))
    from engine.api import world_size

    return world_size(parallel)


# (config name, parallel, height, extra flag): the "Must show" set.
CONFIGS = [
    ("sp1@1024", "sp1", 1024, None),
    ("ulysses2@1024", "ulysses2", 1024, None),
    ("ulysses4@1024", "ulysses4", 1024, None),
    ("ring4@1024", "ring4", 1024, None),
    ("usp2x2@1024", "usp2x2", 1024, None),
    ("ring4+ringtext@1024", "ring4", 1024, "ringtext"),
    ("usp2x2+ringtext@1024", "usp2x2", 1024, "ringtext"),
    ("sp1@2048", "sp1", 2048, None),
    ("ulysses4@2048", "ulysses4", 2048, None),
]


def run_config(name: str, parallel: str, height: int, flag: str | None, args) -> Path:
    out = Path(args.out) / "runs" / name.replace("@", "_").replace("+", "_")
    csv = out / f"bench-{parallel}.csv"
    if csv.exists():
        print(f"[sp_bench] {name}: done before, kept ({csv})", flush=True)
        return csv
    bench = ["bench", "--family", args.family, "--parallel", parallel, "--modes", args.mode, "--height", str(height),
             "--width", str(height), "--iters", str(args.iters), "--warmup", str(args.warmup), "--out", str(out)]
    entry = (["tools/sp_run.py", "--shard-text-with-ring", "--"] if flag == "ringtext" else ["-m", "harness.cli"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world(parallel)}",
           *entry, *bench]
    print(f"[sp_bench] {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return csv


def table(out: Path, names: list[str]) -> pd.DataFrame:
    rows = []
    for name, parallel, height, flag in CONFIGS:
        csv = out / "runs" / name.replace("@", "_").replace("+", "_") / f"bench-{parallel}.csv"
        if name in names and csv.exists():
            frame = pd.read_csv(csv)
            frame.insert(0, "config", name)
            frame["ring_text_sharded"] = flag == "ringtext"
            rows.append(frame)
    if not rows:
        return pd.DataFrame()
    frame = pd.concat(rows, ignore_index=True)
    base = frame[frame.parallel == "sp1"].set_index("height").median_ms
    frame["speedup_vs_sp1"] = [base.get(h, float("nan")) / ms for h, ms in zip(frame.height, frame.median_ms)]
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "reports" / "sp-bench"))
    parser.add_argument("--family", default="flux1")
    parser.add_argument("--mode", default="engine-bf16+compile")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    names = [c[0] for c in CONFIGS]
    parser.add_argument("--only", nargs="+", default=names, choices=names, metavar="CONFIG",
                        help=f"configs to run, of: {', '.join(names)}")
    args = parser.parse_args(argv)
    failed = []
    for name, parallel, height, flag in CONFIGS:
        if name in args.only:
            try:
                run_config(name, parallel, height, flag, args)
            except subprocess.CalledProcessError as e:
                print(f"[sp_bench] {name} FAILED: exit {e.returncode}", flush=True)
                failed.append(name)
    done = [n for n in names if n not in failed]
    frame = table(Path(args.out), done)
    if frame.empty:
        print("[sp_bench] no config finished: nothing to write", flush=True)
        return 1
    frame.to_csv(Path(args.out) / "sp_bench.csv", index=False)
    cols = ["config", "median_ms", "speedup_vs_sp1", "cosine_vs_first", "peak_mem_gb", "device_name"]
    print(frame[[c for c in cols if c in frame]].to_string(index=False), flush=True)
    if failed:
        print(f"[sp_bench] failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
