"""The `parity` command. Every verb has --help; exit codes: 0 pass, 1 fail, 2 error (bad input included)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.quiet import quiet_loading as _quiet_loading

REPO = Path(__file__).resolve().parents[1]
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


class UsageError(ValueError):
    pass


def _model_dirs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        family, sep, path = pair.partition("=")
        if not sep or not family or not path:
            raise UsageError(f"--model-dir expects FAMILY=PATH, got {pair!r}")
        if not Path(path).is_dir():
            raise UsageError(f"--model-dir {family}: {path} is not a folder")
        out[family] = path
    return out


def cmd_zoo_build(args) -> int:
    from harness.zoo import build

    path = build(args.family, args.out, size=args.size, seed=args.seed, overwrite=args.overwrite,
                 sensitive_layer=args.sensitive_layer, draw_device=args.draw_device)
    print(f"wrote {args.family} ({args.size}, seed {args.seed}) to {path}")
    return EXIT_PASS


def _clip(args):
    from harness.clip import ClipScorer

    if bool(args.clip_model) != bool(args.clip_pretrained):
        raise UsageError("--clip-model and --clip-pretrained go together (an open_clip name and a local weights file)")
    if args.clip_model:
        return ClipScorer.from_pretrained(args.clip_model, args.clip_pretrained, device="cpu")
    return ClipScorer.default()


def _device_check(device: str | None) -> None:
    if device is None:
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is visible to torch on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"--device {device!r}: valid choices are cpu, cuda, cuda:N")


# The options that define what a sweep runs: recorded in its run folder, replayed by --resume.
RUN_OPTIONS = ("suite", "device", "cells", "quant_ignored_layers", "backend", "model_dir", "zoo_root", "clip_model",
               "clip_pretrained", "no_golden", "golden_root", "shard", "seeds")


def _recorded_options(args) -> dict:
    out = {k: getattr(args, k) for k in RUN_OPTIONS}
    for k in ("zoo_root", "golden_root", "clip_pretrained"):  # a resume may start from another directory
        out[k] = out[k] and str(Path(out[k]).absolute())
    if out["suite"].endswith(".toml"):
        out["suite"] = str(Path(out["suite"]).absolute())
    out["model_dir"] = out["model_dir"] and [f"{f}={Path(p).absolute()}" for f, _, p in
                                             (pair.partition("=") for pair in out["model_dir"])]
    return out


def _resume_args(args) -> tuple[argparse.Namespace, Path]:
    """args with the recorded options of the run folder --resume names; an option given again must agree."""
    from harness.runstore import locate, read_plan

    out_root, run_id = locate(args.resume)
    recorded = read_plan(out_root / f".tmp-{run_id}")["options"]
    if set(recorded) != set(RUN_OPTIONS):
        raise UsageError(f"run {run_id} did not record the options of a `parity sweep` command line; "
                         "it can only be resumed by the code that started it")
    defaults = parser().parse_args(["sweep"])
    for key in RUN_OPTIONS:
        given = getattr(args, key)
        if given != getattr(defaults, key) and given != recorded[key]:
            raise UsageError(f"--resume runs with the options the run began with: --{key.replace('_', '-')} "
                             f"{given!r} differs from the recorded {recorded[key]!r} (drop it, or start a new run)")
    if args.run_id and args.run_id != run_id:
        raise UsageError(f"--resume continues run {run_id!r}; --run-id {args.run_id!r} names another")
    return argparse.Namespace(**{**vars(args), **recorded, "run_id": run_id}), out_root


def cmd_sweep(args) -> int:
    from harness.executors import make_executor
    from harness.verdict import gate_run_dir
    from harness.refcache import RefCache
    from harness.shards import Shard
    from harness.suites import load_suite
    from harness.sweep import SweepContext, golden_note, new_run_id, run_sweep

    out_root = Path(args.out)
    if args.resume:
        args, out_root = _resume_args(args)
    from harness import token_sweep  # token-logits suites (language-model families) have their own sweep
    if token_sweep.is_token_suite(token_sweep.suite_path(args.suite)):
        return token_sweep.sweep_from_cli(args, out_root)
    suite = load_suite(args.suite)
    if args.executor == "local":  # Ray tasks run on the cluster's devices, not this machine's
        _device_check(args.device)
    if args.device:
        suite = suite.with_device(args.device)
    if args.quant_ignored_layers:
        suite = suite.with_quant_ignored(tuple(args.quant_ignored_layers))
    if args.cells:
        cells = tuple(c for c in suite.cells if any(pat in c.name for pat in args.cells))
        if not cells:
            raise UsageError(f"--cells {args.cells} matches none of {[c.name for c in suite.cells]}")
        suite = type(suite)(suite.name, suite.description, suite.prompts, suite.seeds, cells, suite.path)
    if args.seeds:
        try:
            suite = suite.with_seeds(tuple(args.seeds))
        except ValueError as e:
            raise UsageError(f"--seeds: {e}") from None
    ctx = SweepContext(suite=suite, run_id=args.run_id or new_run_id(suite), backend=args.backend,
                       model_dirs=_model_dirs(args.model_dir), golden=not args.no_golden, clip=_clip(args),
                       ref_cache=None if args.no_ref_cache else RefCache(args.ref_cache),
                       shard=Shard.parse(args.shard) if args.shard else None, resume=bool(args.resume),
                       executor=make_executor(args.executor, args.ray_address, args.clip_model and (
                           args.clip_model, str(Path(args.clip_pretrained).absolute()))),
                       options=_recorded_options(args))
    if args.zoo_root:
        ctx.zoo_root = Path(args.zoo_root)
    if args.golden_root:
        ctx.golden_root = Path(args.golden_root)
    _quiet_loading()
    run_dir, frame = run_sweep(ctx, out_root)
    if note := golden_note(ctx):
        print(f"note: {note}")
    if ctx.ref_cache is not None:
        print(f"reference cache {ctx.ref_cache.root}: {ctx.ref_cache.hits} hits, {ctx.ref_cache.misses} misses")
    print(f"report: {run_dir}")
    if args.no_gate:
        return EXIT_PASS
    return gate_run_dir(run_dir, args.thresholds, _baseline_arg(args), args.junit)


def _baseline_arg(args):
    from harness.gate import AUTO

    if args.no_baseline and args.baseline:
        raise UsageError("--baseline and --no-baseline contradict each other")
    if args.baseline and not Path(args.baseline).is_file():
        raise UsageError(f"--baseline {args.baseline}: no such file (`parity baseline accept RUN` writes one)")
    return None if args.no_baseline else args.baseline or AUTO


def cmd_gate(args) -> int:
    from harness.verdict import gate_run_dir

    return gate_run_dir(Path(args.run_dir), args.thresholds, _baseline_arg(args), args.junit)


def cmd_baseline_accept(args) -> int:
    """Only a run that passes its thresholds may become the baseline: a baseline that already fails would make
    every later run look fine next to it."""
    from harness.baseline import BaselineError, accept
    from harness.gate import format_verdict, judge_run

    for run in [args.run_dir] + list(args.repeat or []):
        result, _ = judge_run(run, args.thresholds, baseline=None)
        if result.exit_code != 0:
            print(format_verdict(result))
            raise UsageError(f"{run} does not pass its thresholds (gate {result.verdict}); "
                             "only a clean run can be accepted as the baseline")
    try:
        path = accept(args.run_dir, args.repeat or [], args.out)
    except BaselineError as e:
        raise UsageError(str(e)) from None
    print(f"accepted {args.run_dir} as the baseline ({len(args.repeat or [])} repeat run(s) measure its noise): {path}")
    return EXIT_PASS


def cmd_compare(args) -> int:
    from harness.baseline import BaselineError, compare_runs, load_pair

    try:
        a, b = load_pair(args.run_a, args.run_b)
    except BaselineError as e:
        raise UsageError(str(e)) from None
    table = compare_runs(a, b)
    out = Path(args.out) if args.out else Path(args.run_b) / "compare.csv"
    table.to_csv(out, index=False)
    changed = table[table["max_abs_sample_delta"].fillna(1.0) != 0]
    print(f"{len(table)} cell x comparison x metric; {len(changed)} changed "
          f"(worse_pct: how much larger the worst sample's error got, in the margins error scale)")
    print((changed if args.changed_only else table).to_string(index=False))
    print(f"wrote {out}")
    return EXIT_PASS


def cmd_merge(args) -> int:
    from harness.verdict import gate_run_dir
    from harness.merge import merge_runs

    out = merge_runs([Path(d) for d in args.run_dirs], Path(args.out))
    print(f"merged {len(args.run_dirs)} shard(s) into {out}")
    return EXIT_PASS if args.no_gate else gate_run_dir(out, args.thresholds)


def cmd_cache_prune(args) -> int:
    from harness.refcache import RefCache, parse_size

    if args.older_than is None and args.max_size is None:
        raise UsageError("cache prune needs --older-than DAYS and/or --max-size SIZE")
    if args.older_than is not None and args.older_than < 0:
        raise UsageError(f"--older-than {args.older_than}: must be >= 0 days")
    cache = RefCache(args.dir)
    result = cache.prune(args.older_than, parse_size(args.max_size) if args.max_size else None)
    print(f"{cache.root}: removed {result.removed} entries ({result.freed_bytes / 2**20:.1f} MiB), "
          f"kept {result.kept} ({result.kept_bytes / 2**20:.1f} MiB)")
    return EXIT_PASS


def cmd_golden_update(args) -> int:
    from harness.golden import GOLDEN_DIR, golden_path, save_golden
    from harness.suites import load_suite
    from harness.sweep import SweepContext, ref_key, run_config

    suite = load_suite(args.suite)
    ctx = SweepContext(suite=suite, run_id="golden-update", model_dirs=_model_dirs(args.model_dir))
    _quiet_loading()
    done = set()
    for cell in suite.cells:
        if not cell.golden or ref_key(cell) in done:
            continue
        done.add(ref_key(cell))
        model_dir = ctx.model_dir(cell)
        runner, _ = ctx.reference(run_config(cell, suite, model_dir))
        for seed in suite.seeds:
            art = runner.generate(run_config(cell, suite, model_dir, seed))
            path = golden_path(GOLDEN_DIR, suite.name, ref_key(cell), seed)
            save_golden(path, art.final_latents, art.images, ctx.model_hash(model_dir))
            print(f"wrote {path.relative_to(REPO)}")
    return EXIT_PASS


def cmd_quantize(args) -> int:
    from harness.quantize import quantize_folder

    if not (Path(args.model_dir) / "model_index.json").is_file():
        raise UsageError(f"{args.model_dir} is not a diffusers model folder (no model_index.json)")
    calibration = None
    if args.calibrate:  # issue 16: static input scales from the largest |input| each layer sees on these prompts
        from engine.api import RunConfig, calibration_formats, folder_family

        if args.format not in calibration_formats():
            raise UsageError(f"--calibrate: format {args.format!r} quantizes weights only (no input scale); "
                             f"calibrated formats: {calibration_formats()}")
        calibration = RunConfig(family=folder_family(args.model_dir), model_dir=str(Path(args.model_dir).absolute()),
                                prompts=tuple(args.calibrate), steps=args.calib_steps, height=args.calib_height,
                                width=args.calib_width, dtype=args.calib_dtype, device=args.calib_device)
    out = quantize_folder(Path(args.model_dir), args.format, Path(args.out), keep_bf16=tuple(args.keep_bf16 or ()),
                          calibration=calibration)
    print(f"wrote {args.format} checkpoint to {out} (the engine loads it with --quant {args.format}; "
          "the reference keeps running the bf16 folder)" + (f"; static input scales calibrated on "
                                                            f"{len(args.calibrate)} prompt(s)" if calibration else ""))
    return EXIT_PASS


def cmd_bench(args) -> int:
    from harness.bench import BenchConfig, parse_ratios, ratio_lines, run_bench

    cfg = BenchConfig(family=args.family, height=args.height, width=args.width, text_tokens=args.text_tokens,
                      iters=args.iters, warmup=args.warmup, parallel=args.parallel, size=args.size, device=args.device,
                      denoisers=tuple(args.denoiser or ()), steps=args.steps, pipeline_warmup=args.pipeline_warmup,
                      pipeline_iters=args.pipeline_iters)
    # A parallel bench times the engine's fastest denoiser path by default (compiled blocks in a CUDA graph).
    modes = args.modes or (["engine-bf16+compile+cuda_graphs"] if args.parallel != "sp1" else
                           ["diffusers-bf16", "engine-bf16"])
    ratios = parse_ratios(args.ratio or [], modes)
    frame = run_bench(cfg, modes, Path(args.out))  # a bad mode, family or device: ValueError, exit 2
    failed = frame[frame["error"] != ""]
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints
        shown = ["mode", "denoiser", "parallel", "median_ms", "min_ms", "weight_gb", "peak_mem_gb", "build_peak_gb",
                 "cosine_vs_first", "psnr_vs_first"]
        print(frame[[c for c in shown if c in frame]].to_string(index=False))
        for line in ratio_lines(frame, ratios):
            print(line)
        for _, row in failed.iterrows():
            print(f"FAILED {row['mode']} ({row['denoiser']}): {row['error']}")
    return EXIT_FAIL if len(failed) else EXIT_PASS


def cmd_sensitivity(args) -> int:
    from harness.sensitivity import SensitivityConfig, default_out, ignored_argument, run_sensitivity

    if args.model_dir and not (Path(args.model_dir) / "model_index.json").is_file():
        raise UsageError(f"--model-dir {args.model_dir} is not a diffusers model folder (no model_index.json)")
    _device_check(args.device)
    cfg = SensitivityConfig(family=args.model, quant=args.quant, model_dir=args.model_dir, size=args.size,
                            suite=args.suite, group=args.group, target_cosine=args.target_cosine,
                            holdout_seeds=tuple(args.holdout_seeds or ()), device=args.device, dtype=args.dtype,
                            height=args.height, width=args.width, max_sequence_length=args.max_sequence_length)
    out = Path(args.out) if args.out else default_out(cfg, REPO / "reports")
    _quiet_loading()
    advice = run_sensitivity(cfg, out)
    print(f"report: {out}\n{ignored_argument(advice)}\nworst held-out cosine: all quantized "
          f"{advice['holdout_worst_cosine_all_quantized']:.6f}, advised {advice['holdout_worst_cosine_advised']:.6f} "
          f"(target {cfg.target_cosine}); {advice['bytes_kept_in_bf16']:,} bytes kept in bf16")
    if not advice["holdout_reached"]:
        print("the advice does not reach the target on the held-out seeds", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_PASS


def cmd_selftest(args) -> int:
    """The gate proves itself (issue 16): every planted bug of the selftest catalogue must fail the gate."""
    from harness.selftest.runner import Options, markdown, run_selftest

    _quiet_loading()
    from harness import token_sweep  # token-logits suites have their own selftest (same catalogue and plants)
    if token_sweep.is_token_suite(token_sweep.suite_path(args.suite)):
        return token_sweep.selftest_from_cli(args)
    code, matrix, out = run_selftest(Options(suite=args.suite, only=args.only, out=Path(args.out),
                                             zoo_root=Path(args.zoo_root) if args.zoo_root else None))
    print(markdown(matrix))
    print(f"detection matrix: {out}/detection.parquet, {out}/detection.md")
    return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0] + " Accuracy gates for "
                                "diffusion engines against the diffusers reference.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    zoo = verbs.add_parser("zoo", help="synthesize model folders").add_subparsers(dest="zoo_verb", required=True)
    b = zoo.add_parser("build", help="write a deterministic diffusers-format model folder")
    b.add_argument("family", help="model family (an unknown name lists the valid ones)")
    b.add_argument("out", help="folder to create")
    b.add_argument("--size", default="tiny", help="tiny (CPU tests) or full (the real architecture)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    b.add_argument("--sensitive-layer", metavar="NAME", help="plant a massive input activation on this layer "
                   "(diffusers name): a deliberately quantization-sensitive model")
    b.add_argument("--draw-device", metavar="DEVICE", help="draw the weights on this GPU (cuda, cuda:N): seconds "
                   "instead of minutes at full size, other values than the CPU's (default: cpu)")
    b.set_defaults(func=cmd_zoo_build)

    s = verbs.add_parser("sweep", help="run a suite and gate it")
    s.add_argument("--suite", default="smoke", help="suite name (harness/suites/*.toml) or a .toml path")
    s.add_argument("--device", help="run every cell on this device instead of the suite's (cpu, cuda, cuda:N)")
    s.add_argument("--out", default=str(REPO / "reports"), help="parent folder of the run folder")
    s.add_argument("--run-id", help="name of the run folder (default: UTC time + suite)")
    s.add_argument("--cells", nargs="+", help="only cells whose name contains one of these substrings")
    s.add_argument("--quant-ignored-layers", nargs="+", metavar="PATTERN",
                   help="keep these layers unquantized in every quant cell (module names, dot boundaries; "
                        "diffusers names such as transformer_blocks.0.attn.to_q reach fused engine modules)")
    s.add_argument("--backend", default="engine", help="backend under test: engine (default) or diffusers")
    s.add_argument("--model-dir", action="append", metavar="FAMILY=PATH", help="use a real model folder")
    s.add_argument("--zoo-root", help="where synthesized zoo folders are cached (default .zoo/)")
    s.add_argument("--clip-model", help="open_clip model name for real CLIP scores (with --clip-pretrained)")
    s.add_argument("--clip-pretrained", help="local open_clip weights file")
    s.add_argument("--thresholds", help="thresholds TOML (default golden/thresholds.toml)")
    s.add_argument("--no-gate", action="store_true", help="write the report without gating")
    s.add_argument("--no-golden", action="store_true", help="skip the reference-vs-golden drift comparison")
    s.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="run these seeds instead of the suite's (false-alarm checks); goldens exist only for the "
                        "suite's own seeds, so reference_vs_golden is skipped for the others and the report says so")
    s.add_argument("--golden-root", help="folder holding <suite>/ goldens (default golden/)")
    s.add_argument("--ref-cache", metavar="DIR", help="reference cache folder, shared storage for a fleet "
                   "(default: $PARITY_REF_CACHE, else .cache/reference)")
    s.add_argument("--no-ref-cache", action="store_true", help="run diffusers for every reference, store nothing")
    s.add_argument("--shard", metavar="K/N", help="run only the K-th of N deterministic slices of the cells "
                   "(combine the shards with `parity merge`)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted sweep (its <out>/.tmp-<run id> "
                   "folder) with the options it began with: complete cells are not run again")
    s.add_argument("--executor", default="local",
                   help="local: cells one after another here (default); ray: each cell a Ray task")
    s.add_argument("--ray-address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    s.set_defaults(func=cmd_sweep)

    m = verbs.add_parser("merge", help="combine the run folders of `sweep --shard K/N` into one report, gate it")
    m.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    m.add_argument("--out", required=True, help="the merged run folder to create")
    m.add_argument("--thresholds", help="thresholds TOML (default golden/thresholds.toml)")
    m.add_argument("--no-gate", action="store_true", help="write the merged report without gating")
    m.set_defaults(func=cmd_merge)

    cache = verbs.add_parser("cache", help="manage the reference cache").add_subparsers(dest="cache_verb",
                                                                                        required=True)
    pr = cache.add_parser("prune", help="delete entries unused for DAYS, then least recently used ones over SIZE")
    pr.add_argument("--dir", help="cache folder (default: $PARITY_REF_CACHE, else .cache/reference)")
    pr.add_argument("--older-than", type=float, metavar="DAYS", help="delete entries unused for this long")
    pr.add_argument("--max-size", metavar="SIZE", help="then keep at most this much, e.g. 20G")
    pr.set_defaults(func=cmd_cache_prune)

    g = verbs.add_parser("gate", help="gate a finished run folder: exit 0 pass, 1 fail, 2 error")
    g.add_argument("run_dir")
    g.add_argument("--thresholds", help="thresholds TOML (default golden/thresholds.toml)")
    g.set_defaults(func=cmd_gate)
    for p_ in (s, g):
        p_.add_argument("--baseline", help="baseline parquet (default: golden/baseline/<suite>.parquet if accepted)")
        p_.add_argument("--no-baseline", action="store_true", help="gate against the thresholds only")
        p_.add_argument("--junit", metavar="PATH", help="also write the JUnit XML here (junit.xml is always in the run)")

    base = verbs.add_parser("baseline", help="accepted baselines the gate checks regressions against"
                            ).add_subparsers(dest="baseline_verb", required=True)
    ba = base.add_parser("accept", help="store a clean run's per-sample values as its suite's baseline")
    ba.add_argument("run_dir")
    ba.add_argument("--repeat", nargs="+", metavar="RUN",
                    help="clean repeat runs of the same suite and seeds: their spread is the stored noise")
    ba.add_argument("--out", help="baseline file (default golden/baseline/<suite>.parquet)")
    ba.add_argument("--thresholds", help="thresholds the runs must pass (default golden/thresholds.toml)")
    ba.set_defaults(func=cmd_baseline_accept)

    c = verbs.add_parser("compare", help="per-metric deltas of two runs (e.g. main vs a pull request)")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", help="CSV to write (default RUN_B/compare.csv)")
    c.add_argument("--changed-only", action="store_true", help="print only metrics whose values changed")
    c.set_defaults(func=cmd_compare)

    gold = verbs.add_parser("golden", help="manage golden reference outputs").add_subparsers(dest="golden_verb", required=True)
    u = gold.add_parser("update", help="re-run the diffusers reference and overwrite the suite's goldens")
    u.add_argument("--suite", default="smoke")
    u.add_argument("--model-dir", action="append", metavar="FAMILY=PATH")
    u.set_defaults(func=cmd_golden_update)
    q = verbs.add_parser("quantize", help="write a ModelOpt-style NVFP4 (or fp8 weight-only) copy of a model folder")
    q.add_argument("model_dir", help="a bf16 diffusers-format model folder")
    q.add_argument("--format", required=True, choices=["nvfp4", "fp8-wo"])
    q.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    q.add_argument("--keep-bf16", nargs="+", metavar="PATTERN",
                   help="layers to keep in bf16 (module names, dot boundaries; diffusers names)")
    q.add_argument("--calibrate", nargs="+", metavar="PROMPT",
                   help="run these prompts through the bf16 model and write each quantized module's static "
                        "input_scale (amax / (6 * 448), NVFP4 only)")
    q.add_argument("--calib-steps", type=int, default=4, help="sampling steps of the calibration run (default 4)")
    q.add_argument("--calib-height", type=int, default=64, help="image height of the calibration run (default 64)")
    q.add_argument("--calib-width", type=int, default=64, help="image width of the calibration run (default 64)")
    q.add_argument("--calib-dtype", default="bf16", help="compute dtype of the calibration run (default bf16)")
    q.add_argument("--calib-device", default="cpu", help="device of the calibration run (default cpu)")
    q.set_defaults(func=cmd_quantize)

    sens = verbs.add_parser("sensitivity", help="rank layers by quantization error; advise which to keep in bf16")
    sens.add_argument("--model", required=True, help="model family (a registered engine family name)")
    sens.add_argument("--model-dir", help="a diffusers model folder (inputs captured by running its pipeline); "
                                          "default: weights and inputs synthesized by the zoo on --device")
    sens.add_argument("--size", default="tiny", help="zoo size when synthesizing: tiny or full")
    sens.add_argument("--quant", required=True, help="quant mode: fp8, fp8-wo, nvfp4, nvfp4-wo, mxfp4, mxfp4-wo")
    sens.add_argument("--target-cosine", type=float, default=0.99,
                      help="worst single-step cosine the advice must reach (default 0.99)")
    sens.add_argument("--group", default="layer", help="layer, block or kind (one linear in every block)")
    sens.add_argument("--device", default="cpu")
    sens.add_argument("--dtype", default="bf16")
    sens.add_argument("--suite", default="smoke", help="prompts, seeds and sampling settings")
    sens.add_argument("--holdout-seeds", type=int, nargs="+", help="seeds to check the advice on (default: as "
                                                                     "many seeds after the suite's largest)")
    sens.add_argument("--height", type=int, help="image height (default: the suite's)")
    sens.add_argument("--width", type=int)
    sens.add_argument("--max-sequence-length", type=int, help="text tokens (default: the suite's)")
    sens.add_argument("--out", help="folder to create (default reports/<time>-sensitivity-...)")
    sens.set_defaults(func=cmd_sensitivity)
    st = verbs.add_parser("selftest", help="plant every catalogued bug, run the sweep and gate: exit 1 if any escapes")
    st.add_argument("--suite", default="smoke", help="suite whose cells the plants run on")
    st.add_argument("--only", nargs="+", metavar="PATTERN", help="plants whose name contains PATTERN, or an area")
    st.add_argument("--out", default=str(REPO / "reports" / "selftest"), help="parent folder of the selftest run")
    st.add_argument("--zoo-root", help="where synthesized zoo folders are cached (default .zoo/)")
    st.set_defaults(func=cmd_selftest)

    bench = verbs.add_parser("bench", help="time one full-size denoiser forward (or whole pipeline) per mode on a GPU")
    bench.add_argument("--family", required=True, help="model family: every denoiser it declares is timed")
    bench.add_argument("--height", type=int, default=1024)
    bench.add_argument("--width", type=int, default=1024)
    bench.add_argument("--text-tokens", type=int, default=512)
    bench.add_argument("--iters", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--modes", nargs="+", default=None,
                       help="default: diffusers-bf16 engine-bf16, and engine-bf16+compile+cuda_graphs with --parallel; "
                            "diffusers-bf16[+torchao-<fp8-rowwise|fp8-wo>[-blocks]][+compile|+regional] and "
                            "engine-<bf16|quant mode>[+option...] (options: compile, cudnn, autotune and every "
                            "OptimizeSpec switch by name, e.g. +cuda_graphs); diffusers-pipeline-... and "
                            "engine-pipeline-... time the whole pipeline (text encoders, --steps steps, VAE decode); "
                            "the first mode (the first pipeline mode for pipeline modes) is the accuracy baseline; a "
                            "mode that fails is a row with its error (exit 1)")
    bench.add_argument("--ratio", nargs="+", metavar="MODE:PEER",
                       help="print MODE's time over PEER's from this run, with both cosines vs the baseline")
    bench.add_argument("--steps", type=int, default=28, help="pipeline modes: denoising steps per generation")
    bench.add_argument("--pipeline-iters", type=int, default=2, help="pipeline modes: timed generations")
    bench.add_argument("--pipeline-warmup", type=int, default=1, help="pipeline modes: untimed generations first")
    bench.add_argument("--denoiser", nargs="+", default=None,
                       help="time only these denoisers of the family (default: all; e.g. one A14B expert)")
    bench.add_argument("--size", default="full", help="zoo size of the synthesized weights (tiny: a quick CPU check)")
    bench.add_argument("--device", default="cuda", help="cuda, or cpu to check that modes build and agree")
    bench.add_argument("--parallel", default="sp1",
                       help="sequence-parallel config; run under torchrun with that many processes, e.g. "
                            "`torchrun --nproc-per-node 2 -m harness.cli bench --parallel ulysses2`")
    bench.add_argument("--out", default=str(REPO / "reports" / "bench"))
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"parity {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
