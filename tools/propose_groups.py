"""Threshold groups for golden/thresholds.toml from a measured run, with one stated margin policy, so that floors measured
on a device kind (a GPU run's `device = "cuda"` groups) come from the numbers and not from hand edits.

    python tools/propose_groups.py RUN_DIR --device cuda --comparisons optimized_vs_eager --measured-on "4 x H200" \
        [--name-parallel wan wan-ti2v] [--size full] [--seeds 0 1] > groups.toml

One group per (model, dtype, quant, parallel, optimize, comparison) key present in the run's ok rows (per-sample rows,
not per-step curves); `parallel` is "*" (one group over the run's parallel configs) unless the model is named in
--name-parallel (needed where a model already has groups that name a config: a "*" group would tie with them).
Margin policies (--policy), on the error scale of harness/margins.py, from the worst sample of the group:
  floors (default; the device = "cuda" groups of issue 14):
  - cosines, SSIM, CLIP image similarity (1 - v):   5x the worst error
  - dB metrics (SQNR, PSNR):                         7 dB below the worst value (5x its power ratio)
  - relative errors:                                 sqrt(5) x the worst (rel ~ sqrt(2 (1 - cos)), so the cosine's 5x)
  - mean |pixel difference|, |CLIP delta|:           4x the worst
  quant (issue #3's, every FLUX.1 quant group of golden/thresholds.toml): 2x the worst 1 - cosine / 1 - SSIM, 3 dB
  below the worst SQNR / PSNR (to 0.01 dB), 1.5x the worst relative error and MAD, |CLIP delta| max(0.5, 2x), so
  that a new quant mode's groups read like their neighbours'.
--any-device leaves `device` out of the groups (they then judge every device kind, as the CPU-measured quant groups
do; the rows are still read from --device only).
A group whose every gated metric sat at its identical-input value becomes an exactness tier (`exact = true`, the
run's device kind and optimize label): any difference then fails. A metric at its identical-input value inside a
group that is not exact keeps that value as its threshold (bitwise is gated as bitwise). Prints TOML; writes nothing."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.metrics import METRICS  # noqa: E402

KEY = ["model", "dtype", "quant", "parallel", "optimize", "comparison"]


def _round_error_up(e: float) -> float:
    """Two significant digits, rounded away from the measurement (a looser floor never tighter than the margin)."""
    if e <= 0:
        return 0.0
    digits = 1 - math.floor(math.log10(e))
    return math.ceil(e * 10 ** digits - 1e-9) / 10 ** digits  # the 1e-9: 5 x (1 - 0.99998) is 1.0000000000065e-4


@dataclass(frozen=True)
class Policy:
    """One margin policy: factors on the worst sample's error, and the sentence the groups' sources quote."""
    cosine: float  # x the worst 1 - value (cosines, SSIM, CLIP image similarity)
    db: float  # dB below the worst SQNR / PSNR
    db_step: float  # the dB floor rounded down to a multiple of this
    rel_error: float  # x the worst relative error
    mad: float  # x the worst mean |pixel difference|
    absolute: float  # x the worst |value| of an absolute metric (|CLIP delta|)
    absolute_min: float  # ... and never below this
    words: str


POLICIES = {
    "floors": Policy(5.0, 7.0, 1.0, math.sqrt(5), 4.0, 4.0, 0.0,
                     "5x the worst 1 - cosine / 1 - SSIM, 7 dB below the worst SQNR / PSNR, sqrt(5)x the worst relative "
                     "error, 4x the worst MAD and |CLIP delta|"),
    "quant": Policy(2.0, 3.0, 0.01, 1.5, 1.5, 2.0, 0.5,
                    "issue #3's quant margins: 2x the worst 1 - cosine / 1 - SSIM, 3 dB below the worst SQNR / PSNR, "
                    "1.5x the worst relative error and MAD, |CLIP delta| max(0.5, 2x)"),
}


def threshold(metric: str, values: pd.Series, policy: Policy = POLICIES["floors"]) -> tuple[str, float] | None:
    """(at_least | at_most, value) for one gated metric of one group, None for a metric the gate does not judge."""
    spec = METRICS.get(metric)
    if spec is None or not spec.gated or spec.per_step:
        return None
    if spec.absolute:
        worst = float(values.abs().max())
        return "at_most", max(policy.absolute_min, _round_error_up(policy.absolute * worst))
    if not spec.higher_is_better:
        worst = float(values.max())
        factor = policy.mad if "rel_error" not in metric else policy.rel_error
        return "at_most", _round_error_up(factor * worst)
    worst = float(values.min())
    if spec.unit == "dB":
        if spec.identical is not None and worst >= spec.identical:
            return "at_least", float(spec.identical)
        return "at_least", round(math.floor((worst - policy.db) / policy.db_step) * policy.db_step, 2)
    return "at_least", (1.0 - _round_error_up(policy.cosine * (1.0 - worst))) if worst < 1 else 1.0


def is_identical(metric: str, values: pd.Series) -> bool:
    spec = METRICS.get(metric)
    return spec is not None and spec.identical is not None and bool((values == spec.identical).all())


def groups(frame: pd.DataFrame, name_parallel: set[str], policy: Policy = POLICIES["floors"]) -> list[dict]:
    frame = frame.assign(parallel=[p if m in name_parallel else "*" for m, p in zip(frame.model, frame.parallel)])
    out = []
    for key, rows in frame.groupby(KEY, sort=True):
        fields = dict(zip(KEY, key))
        metrics = {m: v.value for m, v in rows.groupby("metric") if threshold(m, v.value, policy) is not None}
        if not metrics:
            continue
        exactable = [m for m in metrics if METRICS[m].identical is not None]
        bitwise = bool(exactable) and all(is_identical(m, metrics[m]) for m in exactable)
        out.append({**fields, "n": _count(rows), "exact": bitwise,
                    "configs": sorted(set(rows.parallel_config)),
                    "limits": {m: threshold(m, v, policy) for m, v in metrics.items()},
                    "worst": {m: (float(v.abs().max()) if METRICS[m].absolute else
                                  float(v.min()) if METRICS[m].higher_is_better else float(v.max()))
                              for m, v in metrics.items()}})
    return out


def _fmt(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() or abs(v) < 1 else f"{v:.1f}"


def _count(rows: pd.DataFrame) -> str:
    """'4 samples' (prompt x seed), or for rows of no sample (per layer, per cell) '340 rows'."""
    samples = len(rows.dropna(subset=["seed", "prompt_idx"]).groupby(["seed", "prompt_idx"]))
    return f"{samples} samples" if samples else f"{len(rows)} rows"


def to_toml(group: dict, device: str, measured_on: str, run: str, policy: Policy = POLICIES["floors"],
            any_device: bool = False, size: str | None = None) -> str:
    lines = ["[[group]]"]
    for k in ("model", "dtype", "quant", "parallel"):
        lines.append(f'{k} = "{group[k]}"')
    if not any_device or group["exact"]:  # a tier holds on the device kind it was measured on, whatever is asked
        lines.append(f'device = "{device}"')
    if size:
        lines.append(f'size = "{size}"')
    if group["optimize"] != "eager" or group["exact"]:  # a tier names its switches; eager groups judge any
        lines.append(f'optimize = "{group["optimize"]}"')
    lines.append(f'comparison = "{group["comparison"]}"')
    over = ", ".join(group["configs"])
    worst = ", ".join(f"{m} {v:.7g}" for m, v in sorted(group["worst"].items()))
    if group["exact"]:  # the tier, then the same key's ordinary thresholds (every gated metric needs one)
        tier = lines + ["exact = true", f'source = "measured bitwise equal on {measured_on} ({run}, {group["n"]}, '
                        f'over {over}): every tensor and image metric at its identical-input value"']
        return "\n".join(tier) + "\n\n" + to_toml({**group, "exact": False}, device, measured_on, run, policy,
                                                   any_device, size)
    lines.append(f'source = "measured on {measured_on} ({run}, {group["n"]}, worst over {over}): {worst}. '
                 f'Margins (tools/propose_groups.py): {policy.words}; a metric measured at its identical-input value '
                 'keeps it"')
    for side in ("at_least", "at_most"):
        items = [f"{m} = {_fmt(v)}" for m, (s, v) in sorted(group["limits"].items()) if s == side]
        if items:
            lines.append(f"{side} = {{ {', '.join(items)} }}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--device", required=True, choices=["cpu", "cuda"], help="the device kind the rows ran on")
    p.add_argument("--comparisons", nargs="+", required=True)
    p.add_argument("--models", nargs="+", help="only these models (default: every model in the run)")
    p.add_argument("--name-parallel", nargs="*", default=[], metavar="MODEL")
    p.add_argument("--measured-on", required=True, help='the cards, e.g. "4 x H200"')
    p.add_argument("--policy", choices=sorted(POLICIES), default="floors", help="margin policy (see the docstring)")
    p.add_argument("--any-device", action="store_true",
                   help="leave `device` out of the groups that are not exactness tiers: they judge every device kind")
    p.add_argument("--size", help="only rows of this zoo size, and the groups name it (tiny floors say nothing "
                   "about a full-size model)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds (measure on some, check the others)")
    args = p.parse_args(argv)
    policy = POLICIES[args.policy]
    frame = pd.read_parquet(args.run_dir / "results.parquet")
    kind = frame.device.astype(str).str.split(":").str[0]
    frame = frame[(kind == args.device) & (frame.status == "ok") & frame.step.isna()
                  & frame.comparison.isin(args.comparisons)]
    if args.models:
        frame = frame[frame.model.isin(args.models)]
    if args.size:
        frame = frame[frame["size"] == args.size]
    if args.seeds:
        frame = frame[frame.seed.isin(args.seeds) | frame.seed.isna()]  # per-cell rows (weights) have no seed
    if frame.empty:
        raise SystemExit(f"{args.run_dir}: no ok {args.device} rows of {args.comparisons}")
    frame = frame.assign(parallel_config=frame.parallel)
    run = f"run {frame.run_id.iloc[0]}"
    for group in groups(frame, set(args.name_parallel), policy):
        print(to_toml(group, args.device, args.measured_on, run, policy, args.any_device, args.size))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
