"""Run a `parity` command with the sequence-parallel wrapper's speed switches set otherwise than by default, to
measure what each one buys (tools/sp_bench.py runs its variants through here):

    --ulysses-chunks N             cut each rank's heads into N pieces for the Ulysses pipeline (1: no pipeline;
                                   default engine.parallel.attention.ULYSSES_CHUNKS). Bitwise the same result.
    --replicate-text-on-ring       keep the text whole on every rank of a ring / USP mesh instead of cutting it
                                   across the ranks (the default for families whose text can be cut, e.g. FLUX.1)
    --save-outputs FILE            rank 0 saves the output of each bench mode's last timed forward (a list, in mode
                                   order, float32 on CPU) to FILE, so that tools/sp_bench.py can compare every
                                   config's output with the 1-GPU one on the same inputs (cosine_vs_sp1)

    python -m torch.distributed.run --standalone --nproc-per-node 4 tools/sp_run.py --ulysses-chunks 1 -- \
        bench --family flux1 --parallel ulysses4 --modes engine-bf16+compile+cuda_graphs
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # torchrun hands the script its arguments through argparse.REMAINDER, which drops a leading "--": with no option
    # before it, the parity command arrives first (every default config of tools/sp_bench.py failed on the GPU so).
    if "--" in argv:
        split = argv.index("--")
    elif argv and not argv[0].startswith("-"):
        argv, split = ["--", *argv], 0
    else:
        raise SystemExit("usage: sp_run.py [--ulysses-chunks N] [--replicate-text-on-ring] [--save-outputs FILE] -- "
                         "<parity command and arguments>")
    parser = argparse.ArgumentParser(prog="sp_run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--ulysses-chunks", type=int, default=None)
    parser.add_argument("--replicate-text-on-ring", action="store_true")
    parser.add_argument("--save-outputs", default=None, metavar="FILE")
    args = parser.parse_args(argv[:split])  # an unknown option exits 2 with the valid ones
    if args.ulysses_chunks is not None and args.ulysses_chunks < 1:
        parser.error(f"--ulysses-chunks must be >= 1, got {args.ulysses_chunks}")
    return args, argv[split + 1:]


def save_outputs(path: Path) -> None:
    """Make `parity bench` (harness.bench.time_forward, which every mode's timing goes through) hand each mode's
    last output to `path` as well, on rank 0 (every rank holds the same gathered output). Rewritten after every
    mode, as the bench's CSV is, so a run cut by a time limit keeps what it finished."""
    import torch

    import harness.bench as bench

    timed, saved = bench.time_forward, []

    def time_and_keep(fn, cfg):
        times, out = timed(fn, cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            saved.append(out.detach().float().cpu())
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(saved, path)
        return times, out
    bench.time_forward = time_and_keep


def main(argv: list[str]) -> int:
    args, rest = parse(argv)
    from engine.parallel.transformer import SequenceParallelTransformer
    from harness.cli import main as parity

    # Class attributes, set in this process only (each torchrun rank runs this file), before any model is wrapped.
    if args.ulysses_chunks is not None:
        SequenceParallelTransformer.ulysses_chunks = args.ulysses_chunks
    if args.replicate_text_on_ring:
        SequenceParallelTransformer.shard_text_with_ring = False
    if args.save_outputs:
        save_outputs(Path(args.save_outputs))
    return parity(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
