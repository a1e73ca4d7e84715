"""One rank of a multi-process engine cell, started by torchrun (see harness.launch, which writes the job file and
reads the result). Every rank builds the runner for the same RunConfig, joins the process group inside
`apply_parallel`, runs generate() and transformer_forward(step0_inputs), and checks that its results equal every
other rank's; rank 0 writes them.

    python -m torch.distributed.run --standalone --nproc-per-node P -m harness.worker --job JOB --out RESULT
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine.api import RunConfig, assert_replicated, open_runner


def _check_same_on_every_rank(x: torch.Tensor, device: str, what: str) -> None:
    # NCCL reduces device tensors only: fingerprint on the run's device.
    assert_replicated(x.to(device), what)


def run(job_path: Path, out_path: Path) -> None:
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
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, required=True,
                        help="torch.save'd {'cfgs': [RunConfig.to_dict()], 'step0_inputs': [denoiser inputs]}")
    parser.add_argument("--out", type=Path, required=True, help="where rank 0 writes the results")
    args = parser.parse_args(argv)
    run(args.job, args.out)


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so that a test's sitecustomize that patches
    # harness.worker (or anything it calls) patches the code that actually runs.
    from harness.worker import main as module_main

    module_main()
