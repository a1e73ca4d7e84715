"""Run a suite: every cell's backend next to the diffusers reference, metrics into long-format rows.

One failing cell becomes error rows and the sweep goes on. The run folder is written under a temporary name
and renamed when complete, so a crashed sweep never leaves a half-written report that looks finished."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from engine.api import Artifacts, OptimizeSpec, RunConfig, preflight as engine_preflight, weight_report
from harness import metrics as M
from harness import conditioning, quant_oracle, schema, selfcheck
from harness.backends import open_backend
from harness.clip import ClipScorer
from harness.golden import GOLDEN_DIR, Golden, GoldenMissing, golden_path, load_golden
from harness.launch import nproc_for, run_engine_distributed_many
from harness.progress import Progress
from harness.rankpool import RankPools
from harness.provenance import model_hash, versions
from harness.refcache import RefCache
from harness.report import write_run
from harness.runstore import CellStore, make_plan, tmp_dir
from harness.shards import Shard
from harness.suites import Cell, Suite, optimize_label
from harness.verdict import write_reports
from harness.zoo import cached_build

DEFAULT_ZOO = Path(__file__).resolve().parents[1] / ".zoo"

# Which metrics each comparison produces: the error rows of a crashed cell list the same names.
ENGINE_METRICS = tuple(name for name, spec in M.METRICS.items() if spec.output == "media"  # token metrics: token_sweep
                       and not spec.per_step and not name.startswith("weight_")
                       and not name.startswith("layer_")  # per-layer checks: harness/quant_oracle.py
                       and name != selfcheck.CROSSCHECK_METRIC)  # the cross-check has its own comparison
GOLDEN_METRICS = ("final_latent_cosine", "psnr_db")


@dataclass
class SweepContext:
    suite: Suite
    run_id: str
    backend: str = "engine"
    zoo_root: Path = DEFAULT_ZOO
    model_dirs: dict[str, str] = field(default_factory=dict)  # family -> folder, overrides the zoo
    golden: bool = True
    golden_root: Path = GOLDEN_DIR
    clip: ClipScorer | None = None
    log: Callable[[str], None] = print
    ref_cache: RefCache | None = None  # reference runs on disk (harness.refcache); None: run diffusers every time
    shard: Shard | None = None  # run only this slice of the cells (harness.shards)
    executor: object = None  # runs the cells (harness.executors); None: one after another in this process
    resume: bool = False  # continue the unfinished run folder of run_id instead of starting afresh
    options: dict = field(default_factory=dict)  # the command line that defines the run, kept for --resume
    rank_pools: RankPools | None = None  # multi-rank cells' ranks kept between cells; None: one torchrun per cell
    _references: dict = field(default_factory=dict)
    _reference_runs: dict = field(default_factory=dict)
    _engine_runners: dict = field(default_factory=dict)
    _engine_runs: dict = field(default_factory=dict)
    _hashes: dict = field(default_factory=dict)

    def model_dir(self, cell: Cell) -> Path:
        if cell.model in self.model_dirs:
            return Path(self.model_dirs[cell.model])
        # A GPU cell of a model bigger than the tiny zoo draws its weights on that GPU: a full-size model drawn on
        # the CPU takes minutes (harness.zoo.synth). Tiny cells keep the CPU's values, on every device.
        draw = cell.device if cell.size != "tiny" and torch.device(cell.device).type == "cuda" else None
        return cached_build(cell.model, cell.size, seed=0, root=self.zoo_root, draw_device=draw)

    def engine_model_dir(self, cell: Cell, model_dir: Path) -> Path:
        """The folder the engine loads: the model itself, or (quant_source = checkpoint) a quantized copy written
        once by `parity quantize` and cached beside the zoo, while the reference keeps the bf16 folder."""
        if cell.quant_source == "online":
            return model_dir
        from harness.quantize import FORMATS, LAYOUT_VERSION, quantize_folder

        fmt = {"nvfp4-wo": "nvfp4"}.get(cell.quant, cell.quant)
        if fmt not in FORMATS:
            raise ValueError(f"quant mode {cell.quant!r} has no checkpoint format; valid: {sorted(FORMATS)} (+ nvfp4-wo)")
        name, calibration = f"{model_dir.name}-{fmt}-v{LAYOUT_VERSION}-{self.model_hash(model_dir)[:8]}", None
        if cell.quant_source == "calibrated":  # static input scales from the suite's prompts (issue 16)
            calibration = run_config(cell, self.suite, model_dir).replace(quant="none", quant_ignored=(), parallel="sp1")
            name += "-static-" + hashlib.sha256(repr(calibration.replace(model_dir="")).encode()).hexdigest()[:8]
        out = self.zoo_root / "quantized" / name
        if not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            quantize_folder(model_dir, fmt, out, calibration=calibration)
        return out

    def model_hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = model_hash(path)
        return self._hashes[path]

    def engine_run(self, cfg: RunConfig, step0_inputs: dict, timeout_s: float = 600.0) -> Artifacts:
        """The backend's artifacts for cfg, with its single-step output on the reference's step-0 inputs in
        extras["single_step"]. Cached by cfg (step0_inputs are the reference's for that same cfg): quant and
        parallel cells compare against one run of their baseline."""
        if cfg not in self._engine_runs:
            if nproc_for(cfg.parallel) > 1:
                art, single_step = self.run_distributed([cfg], [step0_inputs], timeout_s)[0]
            else:
                art, single_step = self._run_local(cfg, step0_inputs)
            art.extras["single_step"] = single_step
            self._engine_runs[cfg] = art
        return self._engine_runs[cfg]

    def _run_local(self, cfg: RunConfig, step0_inputs: dict) -> tuple[Artifacts, torch.Tensor]:
        runner_key = cfg.replace(seed=0)
        if runner_key not in self._engine_runners:
            self._engine_runners.clear()  # one engine model in memory at a time
            self._engine_runners[runner_key] = open_backend(self.backend, runner_key)
        runner = self._engine_runners[runner_key]
        return runner.generate(cfg), runner.transformer_forward(step0_inputs)

    def run_distributed(self, cfgs: list[RunConfig], step0_inputs: list[dict], timeout_s: float
                        ) -> list[tuple[Artifacts, torch.Tensor]]:
        """Multi-rank configs run under torchrun in their own processes, killed after timeout_s; configs that
        differ only in seed share one job (the model is loaded once). With rank_pools the ranks outlive the job
        and serve the next multi-rank cell (process start-up dominates a tiny cell: harness.rankpool)."""
        if self.backend != "engine":
            raise ValueError(f"parallel config {cfgs[0].parallel!r} runs only with the engine backend")
        if self.rank_pools is not None:
            return self.rank_pools.run(cfgs, step0_inputs, timeout_s)
        with tempfile.TemporaryDirectory(prefix="parity-cell-") as workdir:
            return run_engine_distributed_many(cfgs, step0_inputs, nproc_for(cfgs[0].parallel), timeout_s,
                                               Path(workdir))

    def prefetch_distributed(self, cfgs: list[RunConfig], step0_inputs: list[dict], timeout_s: float) -> None:
        todo = [(c, x) for c, x in zip(cfgs, step0_inputs) if c not in self._engine_runs]
        if todo:
            if frees_models(cfgs[0].device):  # the ranks' models need the memory this process's engine model holds
                self.free_models(engine=True)
            results = self.run_distributed([c for c, _ in todo], [x for _, x in todo], timeout_s)
            for (cfg, _), (art, single_step) in zip(todo, results):
                art.extras["single_step"] = single_step
                self._engine_runs[cfg] = art

    def free_models(self, reference: bool = False, engine: bool = False) -> None:
        """Drop the loaded reference and/or engine model, keeping their runs (in this process, and the reference's in
        the cache), and hand the freed device memory back so that other processes (the ranks) can use it."""
        if reference:
            self._references.clear()
        if engine:
            self._engine_runners.clear()
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def reference(self, cfg: RunConfig) -> tuple[object, dict[int, Artifacts]]:
        """diffusers runs depend on neither quant nor parallel: one runner and one run per seed, shared."""
        key = cfg.replace(quant="none", quant_ignored=(), parallel="sp1", optimize=OptimizeSpec(), seed=0)
        if key not in self._references:
            self._references.clear()  # one reference model in memory at a time
            self._references[key] = (open_backend("diffusers", key), {})
        return self._references[key]

    def reference_run(self, cfg: RunConfig, model_hash: str) -> Artifacts:
        """The reference's artifacts for cfg (seed included), with its single-step output on its own step-0
        inputs in extras["single_step"]: from this process, else from the reference cache, else from diffusers
        (whose model is loaded only on a cache miss)."""
        key = cfg.replace(quant="none", quant_ignored=(), parallel="sp1", optimize=OptimizeSpec(), seed=0)
        runs = self._reference_runs.setdefault(key, {})
        if len(self._reference_runs) > 1:  # one reference's runs in memory at a time, as for its model
            self._reference_runs = {key: runs}
        if cfg.seed not in runs:
            run_cfg = key.replace(seed=cfg.seed)
            art = self.ref_cache.get(run_cfg, model_hash) if self.ref_cache is not None else None
            if art is None:
                runner, _ = self.reference(key)
                art = runner.generate(run_cfg)
                art.extras["single_step"] = runner.transformer_forward(art.step0_inputs)
                if self.ref_cache is not None:
                    self.ref_cache.put(run_cfg, model_hash, art)
            runs[cfg.seed] = art
        return runs[cfg.seed]


def frees_models(device: str) -> bool:
    """Whether a model is dropped as soon as its runs are in hand. On an accelerator: a full-size reference kept
    beside the engine, and the engine's one-device model kept beside rank 0 of a parallel cell, needed about 102 GB
    on the first GPU of the sp-full suite (measured on an H200), more than an 80 GB card holds, while the
    runs they are kept for are already memoized (one reference run per seed, one engine run per config). On the CPU
    models are kept: the tiny zoo's reload costs more time than its memory is worth, and the selftest shares one
    reference model between all its sweeps."""
    return torch.device(device).type != "cpu"


def ref_key(cell: Cell) -> str:
    """Names the reference run a golden stores: what diffusers sees (not quant or parallel, which it never
    runs), readable first, then a short hash of the sampling settings so a changed suite cannot match old files.
    The family's sampling fields come from its dataclass, in declaration order."""
    sampling = repr((cell.steps, cell.height, cell.width) + dataclasses.astuple(cell.sampling))
    return f"{cell.model}-{cell.size}-{cell.dtype}-{cell.device}-{hashlib.sha256(sampling.encode()).hexdigest()[:8]}"


def run_config(cell: Cell, suite: Suite, model_dir: Path, seed: int = 0) -> RunConfig:
    """The cell's RunConfig: every RunConfig field the Cell has a field of the same name for, plus the suite's
    prompts and the seed."""
    shared = {f.name for f in dataclasses.fields(RunConfig)} & {f.name for f in dataclasses.fields(Cell)}
    return RunConfig(family=cell.model, model_dir=str(model_dir), prompts=suite.prompts, seed=seed,
                     **{name: getattr(cell, name) for name in shared})


class Rows:
    """Collects rows for one cell x seed; every metric goes through `add`, which turns MetricError into
    'invalid' rows carrying the reason, one per sample."""

    def __init__(self, base: dict, n_samples: int, prompts: tuple[str, ...]):
        self.base, self.n, self.prompts, self.rows = base, n_samples, prompts, []

    def _row(self, i, comparison, metric, value, status, reason, step=pd.NA):
        return {**self.base, "prompt_idx": i, "prompt": self.prompts[i], "comparison": comparison,
                "metric": metric, "step": step, "value": float(value), "status": status, "reason": reason}

    def add(self, comparison: str, metric: str, compute: Callable[[], np.ndarray]) -> np.ndarray | None:
        try:
            values = np.asarray(compute(), dtype=np.float64)
        except M.MetricError as e:
            self.rows += [self._row(i, comparison, metric, np.nan, schema.INVALID, str(e)) for i in range(self.n)]
            return None
        if values.shape != (self.n,):
            raise RuntimeError(f"metric {metric} returned shape {values.shape}, expected ({self.n},)")
        self.rows += [self._row(i, comparison, metric, v, schema.OK, "") for i, v in enumerate(values)]
        return values

    def add_steps(self, comparison: str, metric: str, compute: Callable[[], np.ndarray]) -> None:
        try:
            values = np.asarray(compute(), dtype=np.float64)  # (steps, B)
        except M.MetricError:
            return  # the gated minimum of the same curve records the reason
        self.rows += [self._row(i, comparison, metric, values[s, i], schema.OK, "", step=s)
                      for s in range(values.shape[0]) for i in range(self.n)]

    def errors(self, comparison: str, metrics: tuple[str, ...], reason: str) -> None:
        self.rows += [self._row(i, comparison, m, np.nan, schema.ERROR, reason) for m in metrics for i in range(self.n)]


def compare(rows: Rows, c: str, test: Artifacts, ref: Artifacts, prompts: list[str], clip: ClipScorer | None, *,
            family: str) -> None:
    """Every metric of `test` against `ref` under comparison name c; CLIP scores only when a scorer is given."""
    conditioning.add_rows(rows, c, family, test, ref)  # the step-0 conditioning the family declares
    test_step, ref_step = test.extras["single_step"], ref.extras["single_step"]
    rows.add(c, "single_step_cosine", lambda: M.cosine(test_step, ref_step, what="engine single-step output"))
    rows.add(c, "single_step_rel_error", lambda: M.rel_error(test_step, ref_step, what="engine single-step output"))
    rows.add(c, "single_step_sqnr_db", lambda: M.sqnr_db(test_step, ref_step, what="engine single-step output"))
    rows.add(c, "final_latent_cosine", lambda: M.cosine(test.final_latents, ref.final_latents, what="engine final latents"))
    rows.add(c, "final_latent_rel_error", lambda: M.rel_error(test.final_latents, ref.final_latents, what="engine final latents"))
    rows.add(c, "final_latent_sqnr_db", lambda: M.sqnr_db(test.final_latents, ref.final_latents, what="engine final latents"))
    traj = lambda: M.trajectory_cosine(test.step_latents, ref.step_latents, what="engine trajectory")  # noqa: E731
    rows.add_steps(c, "trajectory_cosine", traj)
    rows.add(c, "trajectory_cosine_min", lambda: traj().min(axis=0))
    rows.add(c, "step_output_cosine_min",
             lambda: M.trajectory_cosine(test.step_outputs, ref.step_outputs, what="engine step outputs").min(axis=0))

    def images(metric):
        def compute():
            # Images decoded from non-finite latents are garbage that can still score well: refuse them.
            M.check_finite(test.final_latents, "engine final latents (decoded into these images)")
            return metric(test.images, ref.images)
        return compute

    rows.add(c, "psnr_db", images(M.psnr_db))
    rows.add(c, "ssim", images(M.ssim))
    rows.add(c, "mean_abs_diff", images(M.mean_abs_diff))
    if np.ndim(ref.images) == 5 and np.shape(ref.images)[1] > 1:
        compare_video(rows, c, test, ref, images)
    if clip is None:
        return
    test_score = rows.add(c, "clip_score_test", images(lambda t, r: clip.text_image_score(t, prompts)))
    ref_score = rows.add(c, "clip_score_ref", lambda: clip.text_image_score(ref.images, prompts))

    def delta():
        if test_score is None or ref_score is None:
            raise M.MetricError("a CLIP score it depends on was refused (see clip_score_test / clip_score_ref)")
        return test_score - ref_score

    rows.add(c, "clip_score_delta", delta)
    rows.add(c, "clip_image_similarity", images(clip.image_image_similarity))


def compare_video(rows: Rows, c: str, test: Artifacts, ref: Artifacts, images) -> None:
    """Per-frame and temporal rows of a video (F > 1): the worst and the mean frame, the motion between frames, and,
    where a backend says how many latent frames its (B, N, C) latents hold (extras["latent_frames"]), each latent
    frame's cosine."""
    for name, per_frame, worst in (("video_psnr_db", M.frame_psnr_db, np.min), ("video_ssim", M.frame_ssim, np.min),
                                   ("video_mad", M.frame_mean_abs_diff, np.max)):
        label = f"{name}_{'min' if worst is np.min else 'max'}"
        rows.add(c, label, images(lambda t, r, f=per_frame, w=worst: w(f(t, r), axis=1)))
        rows.add(c, f"{name}_mean", images(lambda t, r, f=per_frame: f(t, r).mean(axis=1)))
    rows.add(c, "frame_diff_cosine_min", images(M.frame_diff_cosine_min))
    frames = ref.extras.get("latent_frames", test.extras.get("latent_frames"))
    if frames is not None:
        rows.add(c, "frame_latent_cosine_min",
                 lambda: M.frame_latent_cosine_min(test.final_latents, ref.final_latents, int(frames)))


def weight_rows(cell: Cell, ctx: SweepContext, model_dir: Path, engine_cfg: RunConfig, run_dir: Path) -> list[dict]:
    """L0: every quantized linear's dequantized weight, in every denoiser, against the bf16 checkpoint it came from,
    with the model built as the cell runs it (dtype, device). The minimum over layers is a gated row; the
    per-layer values go to weights.csv next to the results. The engine dequantizes one layer at a time: a
    full-size model never exists in fp32."""
    per_layer = [{"cell": cell.name, "denoiser": denoiser, "layer": layer,
                  "sqnr_db": float(M.sqnr_db(weight[None], ref[None], what=f"dequantized {denoiser}.{layer}.weight")[0])}
                 for denoiser, layer, weight, ref in weight_report(engine_cfg, model_dir)]
    table = pd.DataFrame(per_layer, columns=["cell", "denoiser", "layer", "sqnr_db"])
    path = run_dir / "weights.csv"
    table.to_csv(path, mode="a", header=not path.exists(), index=False)
    rows = Rows({**cell_columns(cell, ctx), "seed": pd.NA, "model_hash": ctx.model_hash(model_dir)}, 1, ("",))
    rows.add(schema.ENGINE_VS_UNQUANTIZED, "weight_sqnr_db_min", lambda: np.array([table.sqnr_db.min()])
             if len(table) else _no_quantized_layers(cell))
    for r in rows.rows:
        r["prompt_idx"], r["prompt"] = pd.NA, ""
    return rows.rows


def _no_quantized_layers(cell: Cell):
    raise M.MetricError(f"quant mode {cell.quant!r} quantized no linear layer of {cell.model}")


def baselines(engine_cfg: RunConfig, bf16_cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """What else a cell is compared with, to separate the causes of its error from the reference: the same
    engine unquantized (from the bf16 folder, on one device), the same engine on one device, and a cell with speed
    switches (engine.optimize) against the same engine eager, so that each switch's own error is gated apart from the
    reference's. A parallel cell's one-device twin keeps its switches (that comparison isolates the parallelism); its
    eager twin keeps the parallel config, so a switch that acts only across ranks (sp_overlap) is compared with the
    same ranks without it."""
    out = []
    if engine_cfg.quant != "none":
        out.append((schema.ENGINE_VS_UNQUANTIZED, bf16_cfg.replace(quant="none", quant_ignored=(), parallel="sp1",
                                                                   optimize=OptimizeSpec())))
    if engine_cfg.parallel != "sp1":
        out.append((schema.PARALLEL_VS_SINGLE, engine_cfg.replace(parallel="sp1")))
    if engine_cfg.optimize != OptimizeSpec():
        out.append((schema.OPTIMIZED_VS_EAGER, engine_cfg.replace(optimize=OptimizeSpec())))
    return out


def compare_golden(rows: Rows, ref: Artifacts, golden: Golden) -> None:
    """Reference drift rows, each carrying the golden's library versions beside the run's; when they differ, the
    row's note says which moved, so a failure points at the upgrade."""
    c = schema.REFERENCE_VS_GOLDEN
    first = len(rows.rows)
    rows.add(c, "final_latent_cosine", lambda: M.cosine(ref.final_latents, golden.final_latents,
                                                        what="reference final latents"))
    rows.add(c, "psnr_db", lambda: M.psnr_db(ref.images, golden.images))
    note = golden.version_note(versions())
    for row in rows.rows[first:]:
        row.update(golden.columns())
        if note and row["status"] == schema.OK:
            row["reason"] = note


def save_images(folder: Path, seed: int, test: Artifacts, ref: Artifacts) -> None:
    """One PNG per sample and frame of each side (media are (B, F, H, W, 3)); a single frame keeps the plain name."""
    folder.mkdir(parents=True, exist_ok=True)
    for side, media in (("engine", test.images), ("reference", ref.images)):
        for i, frames in enumerate(media):
            for f, frame in enumerate(frames):
                suffix = "" if len(frames) == 1 else f"_f{f}"
                Image.fromarray(frame).save(folder / f"seed{seed}_p{i}{suffix}_{side}.png")


def cell_columns(cell: Cell, ctx: SweepContext) -> dict:
    """The row columns that describe the cell: schema's cell and sample columns read off the Cell (the backend
    and optimize label from the context and spec), then one column per field of the family's sampling object."""
    named = {"run_id": ctx.run_id, "cell": cell.name, "backend": ctx.backend, "optimize": optimize_label(cell.optimize)}
    generic = {c: named[c] if c in named else getattr(cell, c) for c in ("run_id", "cell") + schema.CELL_COLUMNS
               + schema.SAMPLE_COLUMNS if c in named or hasattr(cell, c)}
    return {**generic, **dataclasses.asdict(cell.sampling)}


def run_cell(cell: Cell, ctx: SweepContext, images_dir: Path) -> list[dict]:
    suite, prompts = ctx.suite, list(ctx.suite.prompts)
    model_dir = ctx.model_dir(cell)
    base = {**cell_columns(cell, ctx), "model_hash": ctx.model_hash(model_dir)}
    out: list[dict] = []
    cfg0 = run_config(cell, suite, model_dir)
    engine_cfg0 = cfg0.replace(model_dir=str(ctx.engine_model_dir(cell, model_dir)))
    if cell.quant != "none":
        out += weight_rows(cell, ctx, model_dir, engine_cfg0, images_dir.parent)
    ref_runs = {seed: ctx.reference_run(cfg0.replace(seed=seed), base["model_hash"]) for seed in suite.seeds}
    if frees_models(cell.device):  # every seed's reference run is in hand: the engine gets the memory
        ctx.free_models(reference=True)
    # issue 16: each quantized linear against torchao, and the layers left unquantized. Single-device cells only: the
    # probe builds the model on one device in this process, so on a parallel cell it would repeat its sp1 twin.
    if cell.quant != "none" and cell.parallel == "sp1":
        t0 = time.perf_counter()
        out += quant_oracle.cell_rows(cell, base, engine_cfg0, model_dir, ref_runs[suite.seeds[0]].step0_inputs,
                                      images_dir.parent)
        ctx.log(f"  quant oracle: {time.perf_counter() - t0:.1f}s")
    if nproc_for(cell.parallel) > 1:
        ctx.prefetch_distributed([engine_cfg0.replace(seed=s) for s in suite.seeds],
                                 [ref_runs[s].step0_inputs for s in suite.seeds], cell.timeout_s)
    for seed in suite.seeds:
        cfg = cfg0.replace(seed=seed)
        rows = Rows({**base, "seed": seed}, len(prompts), suite.prompts)
        ref = ref_runs[seed]
        t0 = time.perf_counter()
        test = ctx.engine_run(engine_cfg0.replace(seed=seed), ref.step0_inputs, cell.timeout_s)
        rows.base.update(weight_bytes=test.extras.get("weight_bytes", np.nan),  # NaN: the backend does not say
                         quantized_fraction=test.extras.get("quantized_param_fraction", np.nan),
                         fp8_scaled_mm_linears=test.extras.get("n_fp8_scaled_mm_linears", np.nan))
        ctx.log(f"  seed {seed}: engine {time.perf_counter() - t0:.1f}s")
        rows.base[selfcheck.PROVENANCE_COLUMN] = selfcheck.reference_stamp(ref)  # issue 16 (a)
        compare(rows, schema.ENGINE_VS_REFERENCE, test, ref, prompts, ctx.clip, family=cell.model)
        selfcheck.add_rows(rows, test, ref, cell, seed)  # issue 16 (c), (d): negative controls, cross-checks
        for comparison, baseline_cfg in baselines(engine_cfg0.replace(seed=seed), cfg):
            compare(rows, comparison, test, ctx.engine_run(baseline_cfg, ref.step0_inputs), prompts, None,
                    family=cell.model)
        if ctx.golden and cell.golden and seed in suite.golden_seeds:  # other seeds have none: golden_note()
            try:
                golden = load_golden(golden_path(ctx.golden_root, suite.name, ref_key(cell), seed), base["model_hash"])
            except GoldenMissing as e:
                rows.errors(schema.REFERENCE_VS_GOLDEN, GOLDEN_METRICS, str(e))
            else:
                compare_golden(rows, ref, golden)
        save_images(images_dir / cell.name.replace("/", "_"), seed, test, ref)
        out += rows.rows
    return out


def golden_note(ctx: SweepContext) -> str:
    """Why some seeds were not compared with goldens (`--seeds` beyond the suite's own), '' when all were."""
    skipped = [s for s in ctx.suite.seeds if s not in ctx.suite.golden_seeds]
    if not ctx.golden or not skipped or not any(c.golden for c in ctx.suite.cells):
        return ""
    return (f"reference_vs_golden skipped for seeds {skipped}: goldens exist only for the suite's own seeds "
            f"{list(ctx.suite.golden_seeds)} (`parity golden update` writes them); every other comparison ran")


def new_run_id(suite: Suite) -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{suite.name}"


def preflight(ctx: SweepContext) -> None:
    """Input errors that would make every cell fail the same way are reported before anything runs or is
    written (the CLI turns them into exit 2): quant specs that cannot apply, unknown parallel or optimize specs."""
    for cell in ctx.suite.cells:
        try:
            engine_preflight(run_config(cell, ctx.suite, ctx.model_dir(cell)))
        except ValueError as e:
            raise ValueError(f"cell {cell.name}: {e}") from None


def cell_rows(cell: Cell, ctx: SweepContext, images_dir: Path) -> list[dict]:
    """run_cell, except that a failing cell becomes error rows: one failing cell never takes down a sweep."""
    try:
        return run_cell(cell, ctx, images_dir)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        ctx.log(f"  ERROR {reason}\n{traceback.format_exc(limit=6)}")
        return error_rows(cell, ctx, reason)


class LocalExecutor:
    """Cells one after another in this process; multi-rank cells under torchrun, in ranks kept alive from one
    cell to the next (harness.rankpool) and stopped when the last cell is done. Each cell committed when done."""

    def run(self, cells: Sequence[Cell], ctx: SweepContext, store: CellStore) -> None:
        progress = Progress(len(cells), ctx.log)
        with RankPools() as pools:
            ctx.rank_pools = pools
            try:
                for cell in cells:
                    progress.start(cell.name)
                    stage = store.stage(cell)
                    store.commit(cell, cell_rows(cell, ctx, stage / "images"), stage)
                    progress.done()
            finally:
                ctx.rank_pools = None


def error_rows(cell: Cell, ctx: SweepContext, reason: str) -> list[dict]:
    rows = []
    for seed in ctx.suite.seeds:
        r = Rows({**cell_columns(cell, ctx), "seed": seed, "model_hash": ""}, len(ctx.suite.prompts), ctx.suite.prompts)
        r.errors(schema.ENGINE_VS_REFERENCE, tuple(m for m in ENGINE_METRICS if M.METRICS[m].gated
                                                   and (selfcheck.is_video(cell) or not M.METRICS[m].video)), reason)
        rows += r.rows
    return rows


def run_sweep(ctx: SweepContext, out_root: Path) -> tuple[Path, pd.DataFrame]:
    """Run the suite's cells (ctx.shard's slice of them) with ctx.executor into <out_root>/.tmp-<run id>/, one
    cell committed at a time (harness.runstore), then write the report and rename the folder to <run id>.
    With ctx.resume the unfinished folder is continued: complete cells are not run again."""

    out_root = Path(out_root)
    preflight(ctx)
    final = out_root / ctx.run_id
    if final.exists():
        raise FileExistsError(f"report folder {final} already exists; pick another --run-id")
    cells = ctx.shard.select(ctx.suite.cells) if ctx.shard else ctx.suite.cells
    tmp = tmp_dir(out_root, ctx.run_id)
    plan = make_plan(ctx.suite, cells, str(ctx.shard) if ctx.shard else None, ctx.backend, ctx.golden, versions(),
                     ctx.options)
    if tmp.exists() and not ctx.resume:
        ctx.log(f"discarding the unfinished {tmp} (`parity sweep --resume {tmp}` would have continued it)")
    store = CellStore.reopen(tmp, plan) if ctx.resume else CellStore.create(tmp, plan)
    if ctx.clip is None:
        ctx.clip = ClipScorer.default()
    provenance = {**versions(), **ctx.clip.provenance()}
    started = time.perf_counter()
    todo = [c for c in cells if not store.done(c)]
    if ctx.resume:
        ctx.log(f"resuming {tmp}: {len(cells) - len(todo)} of {len(cells)} cells complete, running {len(todo)}")
    (ctx.executor or LocalExecutor()).run(todo, ctx, store)
    frame = store.frame(cells)
    store.write_weights(cells)
    for column in schema.MODEL_COLUMNS:  # absent when no cell reported them (all crashed, or another backend)
        if column not in frame:
            frame[column] = np.nan
    for key, value in provenance.items():
        frame[key] = value
    frame["step"] = frame["step"].astype("Int64")
    frame = frame[list(schema.COLUMNS) + [c for c in frame.columns if c not in schema.COLUMNS]]
    meta = {"run_id": ctx.run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "suite": ctx.suite.name, "suite_path": str(ctx.suite.path), "backend": ctx.backend,
            "seconds": round(time.perf_counter() - started, 1), **provenance,
            **selfcheck.write_expected_rows(tmp, dataclasses.replace(ctx.suite, cells=tuple(cells)),  # this shard's cells
                                            golden=ctx.golden, clip=ctx.clip is not None)}  # issue 16
    if ctx.shard:
        meta["shard"] = str(ctx.shard)
    if note := golden_note(ctx):
        meta["golden_note"] = note
    write_run(tmp, frame, meta)
    write_reports(tmp, frame, None, meta)  # summary.md and report.html, marked 'not gated' until the gate runs
    store.close()  # the per-cell rows are all in results.parquet now
    tmp.rename(final)
    return final, frame
