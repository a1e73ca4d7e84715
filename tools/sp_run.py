"""Run a `parity` command with the text cut across a ring's ranks as well (SequenceParallelTransformer.
shard_text_with_ring), to measure it before it becomes the default:

    python -m torch.distributed.run --standalone --nproc-per-node 4 tools/sp_run.py --shard-text-with-ring -- \
        bench --family flux1 --parallel ring4 --modes engine-bf16+compile
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: sp_run.py [--shard-text-with-ring] -- <parity command and arguments>")
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1:]
    if bad := set(own) - {"--shard-text-with-ring"}:
        raise SystemExit(f"unknown option(s) {sorted(bad)}; valid: --shard-text-with-ring")
    from engine.parallel.transformer import SequenceParallelTransformer
    from harness.cli import main as parity

    SequenceParallelTransformer.shard_text_with_ring = "--shard-text-with-ring" in own
    return parity(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
