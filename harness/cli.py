"""The `parity` command. Every verb has --help; exit codes: 0 pass, 1 fail, 2 error (bad input included)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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

    path = build(args.family, args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
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


def _quiet_loading() -> None:
    """Per-component progress bars drown the sweep log; called by the verbs that load models, never on import."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def cmd_sweep(args) -> int:
    from harness.gate import gate_run_dir
    from harness.suites import load_suite
    from harness.sweep import SweepContext, new_run_id, run_sweep

    suite = load_suite(args.suite)
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
    ctx = SweepContext(suite=suite, run_id=args.run_id or new_run_id(suite), backend=args.backend,
                       model_dirs=_model_dirs(args.model_dir), golden=not args.no_golden, clip=_clip(args))
    if args.zoo_root:
        ctx.zoo_root = Path(args.zoo_root)
    if args.golden_root:
        ctx.golden_root = Path(args.golden_root)
    _quiet_loading()
    run_dir, frame = run_sweep(ctx, Path(args.out))
    print(f"report: {run_dir}")
    if args.no_gate:
        return EXIT_PASS
    return gate_run_dir(run_dir, args.thresholds)


def cmd_gate(args) -> int:
    from harness.gate import gate_run_dir

    return gate_run_dir(Path(args.run_dir), args.thresholds)


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
    out = quantize_folder(Path(args.model_dir), args.format, Path(args.out), keep_bf16=tuple(args.keep_bf16 or ()))
    print(f"wrote {args.format} checkpoint to {out} (the engine loads it with --quant {args.format}; "
          "the reference keeps running the bf16 folder)")
    return EXIT_PASS


def cmd_bench(args) -> int:
    from harness.bench import BenchConfig, run_bench

    cfg = BenchConfig(family=args.family, height=args.height, width=args.width, text_tokens=args.text_tokens,
                      iters=args.iters, warmup=args.warmup, parallel=args.parallel)
    frame = run_bench(cfg, args.modes, Path(args.out))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints
        print(frame[["mode", "parallel", "median_ms", "min_ms", "weight_gb", "cosine_vs_first"]].to_string(index=False))
    return EXIT_PASS


def cmd_selftest(args) -> int:
    """The gate proves itself (issue 16): every planted bug of harness/selftest/catalogue.py must fail the gate."""
    from harness.selftest.runner import Options, markdown, run_selftest

    _quiet_loading()
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
    b.add_argument("family", help="model family, e.g. flux1")
    b.add_argument("out", help="folder to create")
    b.add_argument("--size", default="tiny", help="tiny (CPU tests) or full (the real architecture)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true", help="replace an existing folder")
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
    s.add_argument("--golden-root", help="folder holding <suite>/ goldens (default golden/)")
    s.set_defaults(func=cmd_sweep)

    g = verbs.add_parser("gate", help="gate a finished run folder: exit 0 pass, 1 fail, 2 error")
    g.add_argument("run_dir")
    g.add_argument("--thresholds", help="thresholds TOML (default golden/thresholds.toml)")
    g.set_defaults(func=cmd_gate)

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
    q.set_defaults(func=cmd_quantize)

    st = verbs.add_parser("selftest", help="plant every catalogued bug, run the sweep and gate: exit 1 if any escapes")
    st.add_argument("--suite", default="smoke", help="suite whose cells the plants run on")
    st.add_argument("--only", nargs="+", metavar="PATTERN", help="plants whose name contains PATTERN, or an area")
    st.add_argument("--out", default=str(REPO / "reports" / "selftest"), help="parent folder of the selftest run")
    st.add_argument("--zoo-root", help="where synthesized zoo folders are cached (default .zoo/)")
    st.set_defaults(func=cmd_selftest)

    bench = verbs.add_parser("bench", help="time one full-size denoiser forward per mode on a GPU")
    bench.add_argument("--family", default="flux1")
    bench.add_argument("--height", type=int, default=1024)
    bench.add_argument("--width", type=int, default=1024)
    bench.add_argument("--text-tokens", type=int, default=512)
    bench.add_argument("--iters", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--modes", nargs="+", default=["diffusers-bf16", "engine-bf16"],
                       help="diffusers-bf16 and engine-<bf16|quant mode>[+compile]; the first is the accuracy baseline")
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
