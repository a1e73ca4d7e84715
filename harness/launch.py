"""Run one engine cell on several processes through torchrun, under a timeout, and bring back rank 0's results.

Each cell gets its own torchrun (a fresh `--standalone` rendezvous on a free port, so cells never share a process
group), gloo on CPU and NCCL on CUDA (chosen by apply_parallel from the config's device). Failures become a
DistributedCellError saying why: a rank that crashed (with the tail of its log) or a timeout, after which the whole
process tree is frozen and killed so that no rank is left behind holding a port or a GPU.

`extra_env` is passed to every process; a test can put a directory holding a `sitecustomize.py` on PYTHONPATH to
plant a bug in engine code without the engine knowing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from engine.api import Artifacts, RunConfig, world_size

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 3000


class DistributedCellError(RuntimeError):
    pass


def nproc_for(parallel_name: str) -> int:
    """How many processes a parallel config needs (ulysses x ring x cfg); raises on an unknown name."""
    return world_size(parallel_name)


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        ppid = int(text[text.rfind(")") + 2:].split()[1])  # the command name may hold spaces: cut after ')'
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(root: int) -> list[int]:
    """SIGKILL `root` and every descendant. torchrun starts each rank in a session of its own, so a process-group
    kill would miss them: walk the tree instead, stopping each process before listing its children so nothing
    forks a new one behind our back. Returns the pids killed."""
    seen: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        if pid in seen:
            continue
        _signal(pid, signal.SIGSTOP)
        seen.append(pid)
        frontier += _children_map().get(pid, [])
    for pid in seen:
        _signal(pid, signal.SIGKILL)
    return seen


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def _rank_logs(log_dir: Path) -> dict[int, Path]:
    """torchrun -r 3 writes <log_dir>/<run id>/attempt_<n>/<local rank>/{stdout,stderr}.log; one node, so local
    rank == rank. Reasons quote stderr.log, where tracebacks and warnings go; stdout.log stays on disk."""
    logs: dict[int, Path] = {}
    for path in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        logs[int(path.parent.name)] = path
    return logs


def _exception_line(log: str) -> str:
    """The last 'SomeError: message' line of a traceback, without torchrun's [rankN]: prefix."""
    found = re.findall(r"^(?:\[rank\d+\]:\s*)?([\w.]*(?:Error|Exception|Interrupt)\b.*)$", log, re.M)
    return found[-1].strip() if found else "no exception line in its log"


def _failure_reason(agent_log: Path, log_dir: Path, rc: int) -> str:
    agent = _tail(agent_log, 20000)
    # torchrun's summary names the first failed rank and its exit code under "Root Cause".
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", agent, re.S)
    logs = _rank_logs(log_dir)
    if root:
        rank, code = int(root.group(1)), int(root.group(2))
        what = f"signal {-code}" if code < 0 else f"exit code {code}"
        tail = _tail(logs[rank]) if rank in logs else "(no log)"
        return f"rank {rank} failed first ({what}): {_exception_line(tail)}; tail of its log:\n{tail}"
    tails = "\n".join(f"--- rank {r} ---\n{_tail(p, 1000)}" for r, p in sorted(logs.items()))
    return f"torchrun exited with code {rc}; agent log tail:\n{agent[-LOG_TAIL_CHARS:]}\n{tails}"


def _outer_threads(value: str) -> int:
    """The outermost thread count of an OMP_NUM_THREADS value, which may list one count per nesting level ("4,2");
    a value OpenMP would not take counts as 1 here (the ranks' own OpenMP reports it)."""
    try:
        return max(int(value.split(",")[0]), 1)
    except ValueError:
        return 1


def _job_env(extra_env: Mapping[str, str] | None, cpu: bool = False, nproc: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    extra = dict(extra_env or {})
    # The worker imports `engine` and `harness` from this checkout wherever it is started.
    paths = [p for p in (extra.pop("PYTHONPATH", ""), str(REPO_ROOT), env.get("PYTHONPATH", "")) if p]
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if cpu:
        # CPU results depend on the thread count (measured: the tiny Wan VAE decodes the same latents one level apart
        # with 1 and 2 threads), and torchrun gives every rank 1 unless told: the ranks use this process's count, so
        # a parallel cell computes what its single-device twin and the reference, run here, compute.
        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        # More OpenMP threads than cores (nproc ranks x that count): an idle thread's default busy-wait takes the
        # core a working thread of another rank needs. Measured on 2 cores, 2 ranks x 2 threads, the smoke suite's
        # tiny jobs: 1.2-11.2 s and erratic by default, 0.7-1.5 s passive. Sleeping instead of spinning changes
        # when threads wake, not how work is split: the same bits (the smoke suite's values are identical).
        if nproc * _outer_threads(env["OMP_NUM_THREADS"]) > (os.cpu_count() or 1):
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _on_cpu(cfg: RunConfig) -> bool:
    return torch.device(cfg.device).type == "cpu"


def load_results(path: Path) -> list[tuple[Artifacts, torch.Tensor]]:
    out = []
    for saved in torch.load(path, weights_only=True)["runs"]:
        fields = saved["artifacts"]
        fields["images"] = fields["images"].numpy().astype(np.uint8)
        out.append((Artifacts(**fields), saved["step_output"]))
    return out


def run_engine_distributed(cfg: RunConfig, step0_inputs: dict[str, torch.Tensor], nproc: int, timeout_s: float,
                           workdir: Path, extra_env: Mapping[str, str] | None = None) -> tuple[Artifacts, torch.Tensor]:
    """Run `cfg` on `nproc` processes; return rank 0's generate() artifacts and transformer_forward(step0_inputs)."""
    return run_engine_distributed_many([cfg], [step0_inputs], nproc, timeout_s, workdir, extra_env)[0]


def write_job(path: Path, cfgs: list[RunConfig], step0_inputs: list[dict[str, torch.Tensor]], nproc: int) -> None:
    """Check that the configs make one job for `nproc` ranks and save it where the ranks read it (atomically: a
    pool's ranks poll for the file and must never load half of it)."""
    if not cfgs or len(cfgs) != len(step0_inputs):
        raise ValueError(f"need one step0_inputs per config: {len(cfgs)} configs, {len(step0_inputs)} inputs")
    if len({c.replace(seed=0) for c in cfgs}) != 1:
        raise ValueError("configs of one distributed job may differ only in seed")
    if nproc != nproc_for(cfgs[0].parallel):
        raise ValueError(f"parallel config {cfgs[0].parallel!r} needs {nproc_for(cfgs[0].parallel)} processes, "
                         f"asked for {nproc}")
    if not all(step0_inputs):
        raise ValueError("step0_inputs is empty: transformer_forward needs the reference's denoiser inputs")
    tmp = path.with_suffix(".partial")
    torch.save({"cfgs": [c.to_dict() for c in cfgs],
                "step0_inputs": [{k: v.detach().cpu() for k, v in x.items()} for x in step0_inputs]}, tmp)
    os.replace(tmp, path)


def torchrun_command(nproc: int, log_dir: Path, worker_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--log-dir={log_dir}", "--redirects=3", "--monitor-interval=0.1", "-m", "harness.worker", *worker_args]


def rank_log_tails(log_dir: Path) -> str:
    return "\n".join(f"--- rank {r} ---\n{_tail(p, 1000)}" for r, p in sorted(_rank_logs(log_dir).items()))


def run_engine_distributed_many(cfgs: list[RunConfig], step0_inputs: list[dict[str, torch.Tensor]], nproc: int,
                                timeout_s: float, workdir: Path, extra_env: Mapping[str, str] | None = None
                                ) -> list[tuple[Artifacts, torch.Tensor]]:
    """Run several RunConfigs that differ only in seed in one torchrun job (the model is loaded once); return,
    per config, rank 0's generate() artifacts and transformer_forward(its step0_inputs).

    Raises DistributedCellError when a rank fails, when the whole job exceeds `timeout_s` (every process killed),
    or when rank 0 left no result. (harness.rankpool runs the same jobs in ranks kept alive between cells.)"""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job, result, log_dir, agent_log = (workdir / n for n in ("job.pt", "result.pt", "logs", "torchrun.log"))
    write_job(job, cfgs, step0_inputs, nproc)
    cfg = cfgs[0]
    result.unlink(missing_ok=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    cmd = torchrun_command(nproc, log_dir, ["--job", str(job), "--out", str(result)])
    t0 = time.monotonic()
    with open(agent_log, "w") as agent_out:
        proc = subprocess.Popen(cmd, stdout=agent_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_job_env(extra_env, _on_cpu(cfg), nproc), cwd=REPO_ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed = kill_tree(proc.pid)
            proc.wait()
            raise DistributedCellError(
                f"cell {cfg.parallel} timed out after {timeout_s:.0f}s; killed {len(killed)} processes "
                f"(torchrun and its ranks). Rank log tails:\n{rank_log_tails(log_dir)}") from None
        except BaseException:
            kill_tree(proc.pid)  # interrupted (Ctrl-C, test timeout): leave nothing behind
            proc.wait()
            raise
    if rc != 0:
        raise DistributedCellError(f"cell {cfg.parallel} failed after {time.monotonic() - t0:.1f}s: "
                                   f"{_failure_reason(agent_log, log_dir, rc)}")
    if not result.is_file():
        raise DistributedCellError(f"cell {cfg.parallel}: every rank exited 0 but rank 0 wrote no result at {result}")
    return load_results(result)
