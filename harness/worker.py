"""One rank of a multi-process engine cell, started by torchrun (see harness.launch, which writes the job file and
reads the result). Every rank builds the runner for the same RunConfig, joins the process group inside
`apply_parallel`, runs generate() and transformer_forward(step0_inputs), and checks that its results equal every
other rank's; rank 0 writes them.

    python -m torch.distributed.run --standalone --nproc-per-node P -m harness.worker --job JOB --out RESULT
    python -m torch.distributed.run --standalone --nproc-per-node P -m harness.worker --serve DIR --owner PID

The second form is a rank of a persistent pool (harness.rankpool): it runs DIR/job-0.pt, job-1.pt... in order,
writing DIR/result-<n>.pt, until DIR/stop appears or the process PID that owns the pool is gone. Start-up (importing
torch, diffusers and transformers in every rank) costs more than a tiny cell's work; a pool pays it once per sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.api import RunConfig, assert_replicated, open_runner

POLL_S = 0.02


def _check_same_on_every_rank(x: torch.Tensor, device: str, what: str) -> None:
    # NCCL reduces device tensors only: fingerprint on the run's device.
    assert_replicated(x.to(device), what)


def run(job_path: Path, out_path: Path, finish: bool = True) -> None:
    """One job. finish=False (a pool rank) keeps the process group for the next job."""
    job = torch.load(job_path, weights_only=True)
    cfgs = [RunConfig.from_dict(c) for c in job["cfgs"]]
    if cfgs[0].device.startswith("cuda"):
        # Before any weight is loaded: "cuda" must mean this rank's GPU (apply_parallel checks it did).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    runner = open_runner(cfgs[0])  # the configs differ only in seed: one model load for all
    runs = []
    for cfg, step0_inputs in zip(cfgs, job["step0_inputs"]):
        artifacts = runner.generate(cfg)
        step_output = runner.transformer_forward(step0_inputs).detach().cpu()
        if dist.is_initialized():
            device = "cuda" if cfg.device.startswith("cuda") else "cpu"
            _check_same_on_every_rank(artifacts.final_latents, device, "generate() final latents")
            _check_same_on_every_rank(step_output, device, "transformer_forward() output")
        fields = dataclasses.asdict(artifacts)
        fields["images"] = torch.from_numpy(fields["images"])  # tensors only: the launcher loads weights_only
        runs.append({"artifacts": fields, "step_output": step_output})
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        tmp = out_path.with_suffix(".partial")
        torch.save({"runs": runs}, tmp)
        os.replace(tmp, out_path)  # the launcher never sees a half-written result
    if dist.is_initialized():
        dist.barrier()
        if finish:
            dist.destroy_process_group()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(folder: Path, owner: int) -> None:
    """Run the pool's jobs in order until told to stop; a rank whose owner died exits instead of waiting forever."""
    n = 0
    while True:
        job, stop = folder / f"job-{n}.pt", folder / "stop"
        while not job.exists():
            if stop.exists() or not _alive(owner):
                if dist.is_initialized():
                    dist.destroy_process_group()
                return
            time.sleep(POLL_S)
        run(job, folder / f"result-{n}.pt", finish=False)
        # Each job builds its own model: drop the last one's compiled code (dynamo guards on module identity
        # and would fall back to eager once its recompile limit is reached) and its memory.
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_initialized():  # and hand the freed blocks back: another pool's ranks share these GPUs
            torch.cuda.empty_cache()
        n += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path,
                        help="torch.save'd {'cfgs': [RunConfig.to_dict()], 'step0_inputs': [denoiser inputs]}")
    parser.add_argument("--out", type=Path, help="where rank 0 writes the results")
    parser.add_argument("--serve", type=Path, help="a pool's folder: run its numbered jobs until DIR/stop appears")
    parser.add_argument("--owner", type=int, help="with --serve: exit when this process is gone")
    args = parser.parse_args(argv)
    from harness.quiet import quiet_loading

    quiet_loading()  # each rank loads the engine's diffusers components (the VAE): as quiet as the sweep's own loads
    if args.serve is not None:
        if args.job or args.out or args.owner is None:
            parser.error("--serve takes --owner and neither --job nor --out")
        serve(args.serve, args.owner)
    elif args.job is None or args.out is None:
        parser.error("give --job and --out, or --serve DIR --owner PID")
    else:
        run(args.job, args.out)


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so that a test's sitecustomize that patches
    # harness.worker (or anything it calls) patches the code that actually runs.
    from harness.worker import main as module_main

    module_main()
