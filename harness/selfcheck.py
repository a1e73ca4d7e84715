"""Checks a run makes on itself, so that a harness bug cannot pass silently (issue 16):

(a) provenance: every reference artifact says which backend made it (reference code stamps it, nothing else);
    a run whose reference did not come from the reference backend is an error (exit 2);
(b) row count: the sweep records (expected_rows.json, named in meta.json) how many rows each cell x comparison x metric must have (from the
    suite's design, not from the rows written); the gate fails for every missing row;
(c) negative controls (comparison `negative_control`): the reference's single-step output and final latents with
    noise added at a known SNR, below every SQNR floor of the cell; each control row must FAIL the cell's
    engine_vs_reference threshold for that metric, or the threshold is dead and the gate fails;
(d) metric cross-checks (comparison `self_check`, metric `metric_crosscheck_error`): the controls' metrics against
    their exact values (the noise is made orthogonal to the signal, so cosine, relative error and SQNR are known in
    closed form), and PSNR / mean abs diff / SSIM of the images against an independent recomputation
    (PSNR from the MSE, SSIM == 1 iff identical). A metric computed wrongly in the lenient direction fails here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from harness.schema import NEGATIVE_CONTROL, SELF_CHECK

COMPARISONS = (NEGATIVE_CONTROL, SELF_CHECK)
CROSSCHECK_METRIC = "metric_crosscheck_error"

REFERENCE_BACKEND = "diffusers"  # the only backend whose artifacts may serve as the reference
PROVENANCE_COLUMN = "reference_backend"
UNSTAMPED = "unstamped"
MISSING_ROWS = "missing rows"  # the reason of the gate rows that stand for results a run failed to write

# The control's SNR sits this far below the lowest SQNR floor of the cell's engine thresholds: every threshold
# consistent with those floors must reject it. 3 dB is a factor of 2 in noise energy, far outside round-off.
CONTROL_MARGIN_DB = 3.0
# Used when the cell has no SQNR threshold to derive it from (the value the issue names).
CONTROL_FALLBACK_DB = 20.0
# The control never sits above this SNR. A bitwise group gated at its identical-input values (cosine >= 1, SQNR >= 200
# dB: tools/propose_groups.py) would otherwise get a control at 197 dB, whose float64 cosine reads exactly 1.0 and
# passes "cosine >= 1" (seen on a 4 x H200 sp-wide run). At 140 dB, 1 - cosine = 5e-15, some 45 float64 ulps of 1,
# so every threshold consistent with bitwise equality still rejects it.
CONTROL_MAX_DB = 140.0
CONTROL_METRICS = ("single_step_cosine", "single_step_rel_error", "single_step_sqnr_db",
                   "final_latent_cosine", "final_latent_rel_error", "final_latent_sqnr_db")
# Cross-checks compare float64 computations of the same numbers: any disagreement above round-off is a bug.
CROSSCHECK_TOLERANCE = 1e-6


# ---------------------------------------------------------------- (a) provenance
def reference_stamp(artifacts) -> str:
    """What a reference artifact says about its backend: 'diffusers 0.42.1', or 'unstamped'."""
    backend = artifacts.extras.get("backend")
    if not backend:
        return UNSTAMPED
    return f"{backend} {artifacts.extras.get('backend_version', '?')}"


def provenance_errors(results: pd.DataFrame) -> list[str]:
    if PROVENANCE_COLUMN not in results.columns:
        if not results["status"].eq("ok").any():
            return []  # every cell crashed before its reference was compared: the error rows already fail
        return [f"results carry no {PROVENANCE_COLUMN!r} column: cannot tell which backend made the reference"]
    stamped = results[results[PROVENANCE_COLUMN].notna()]  # crashed cells' error rows carry none
    bad = stamped[stamped[PROVENANCE_COLUMN].astype(str).str.split().str[0] != REFERENCE_BACKEND]
    if bad.empty:
        return []
    cells = sorted(set(bad["cell"].astype(str)))
    stamps = sorted(set(bad[PROVENANCE_COLUMN].astype(str)))
    return [f"the reference of {len(cells)} cell(s) ({', '.join(cells[:4])}) did not come from the reference "
            f"backend {REFERENCE_BACKEND!r} (stamped {stamps}): the run compared the engine against something else"]


# ---------------------------------------------------------------- (b) expected rows
def is_video(cell) -> bool:
    """Whether a cell's media have more than one frame: only those get the video metrics (MetricSpec.video), in
    its rows, its expected rows and the error rows of its crash alike."""
    return getattr(cell.sampling, "num_frames", 1) > 1


def expected_rows(cells, n_seeds: int, n_prompts: int, *, golden: bool, clip: bool,
                  n_golden_seeds: int | None = None) -> dict[str, int]:
    """'cell|comparison|metric' -> rows the run must hold (per-step curves excluded), from the suite's design."""
    from harness import schema
    from harness.metrics import METRICS
    from harness.suites import optimize_label

    engine = [m for m, s in METRICS.items() if s.gated and s.output == "media" and not s.per_step
              and not m.startswith("weight_") and not m.startswith("layer_") and m != CROSSCHECK_METRIC
              and (clip or not m.startswith("clip_"))]
    n = n_seeds * n_prompts
    out: dict[str, int] = {}
    for cell in cells:
        engine_cell = [m for m in engine if is_video(cell) or not METRICS[m].video]
        no_clip = [m for m in engine_cell if not m.startswith("clip_")]
        plan = {schema.ENGINE_VS_REFERENCE: engine_cell, NEGATIVE_CONTROL: CONTROL_METRICS, SELF_CHECK: (CROSSCHECK_METRIC,)}
        if cell.quant != "none":
            plan[schema.ENGINE_VS_UNQUANTIZED] = no_clip
            out[f"{cell.name}|{schema.ENGINE_VS_UNQUANTIZED}|weight_sqnr_db_min"] = 1
            if cell.parallel == "sp1":  # the quant oracle (harness/quant_oracle.py): at least one layer, one set row
                out[f"{cell.name}|{schema.QUANT_ORACLE}|layer_output_rel_error"] = 1
                out[f"{cell.name}|{schema.QUANT_LAYERS}|layer_set_mismatch"] = 1
        if cell.parallel != "sp1":
            plan[schema.PARALLEL_VS_SINGLE] = no_clip
        if optimize_label(cell.optimize) != "eager":  # harness.sweep.baselines: the same engine eager
            plan[schema.OPTIMIZED_VS_EAGER] = no_clip
        if golden and cell.golden and n_golden_seeds != 0:
            plan[schema.REFERENCE_VS_GOLDEN] = ("final_latent_cosine", "psnr_db")
        for comparison, metrics in plan.items():
            for metric in metrics:
                # Goldens exist for the suite's own seeds only (harness.suites.Suite.with_seeds).
                per = n_prompts * n_golden_seeds if comparison == schema.REFERENCE_VS_GOLDEN and \
                    n_golden_seeds is not None else n
                out[f"{cell.name}|{comparison}|{metric}"] = per
    return out


EXPECTED_ROWS_FILE = "expected_rows.json"


def write_expected_rows(run_dir, suite, *, golden: bool, clip: bool) -> dict:
    """Write run_dir/expected_rows.json; returns the meta.json entries that point at it (the gate insists on the
    file when meta names it, so deleting it cannot switch the check off)."""
    import json
    from pathlib import Path

    golden_seeds = sum(s in getattr(suite, "golden_seeds", suite.seeds) for s in suite.seeds)
    expected = expected_rows(suite.cells, len(suite.seeds), len(suite.prompts), golden=golden, clip=clip,
                             n_golden_seeds=golden_seeds)
    (Path(run_dir) / EXPECTED_ROWS_FILE).write_text(json.dumps(expected, indent=1, sort_keys=True))
    return {"expected_rows_file": EXPECTED_ROWS_FILE, "expected_rows_total": sum(expected.values())}


def missing_rows(results: pd.DataFrame, expected: dict[str, int]) -> list[tuple[str, str, str, int, int]]:
    """(cell, comparison, metric, expected, found) wherever a cell that did not crash has fewer rows than planned.
    A crashed cell already fails with its error rows; its other comparisons were never reached."""
    crashed = set(results.loc[results["status"] == "error", "cell"].astype(str))
    steps = results["step"].isna() if "step" in results.columns else pd.Series(True, index=results.index)
    found = results[steps].groupby(["cell", "comparison", "metric"]).size()
    out = []
    for key, n in expected.items():
        cell, comparison, metric = key.split("|")
        have = int(found.get((cell, comparison, metric), 0))
        if have < n and cell not in crashed:
            out.append((cell, comparison, metric, n, have))
    return out


# ---------------------------------------------------------------- (c) negative controls
@lru_cache(maxsize=1)
def _default_thresholds():
    from harness.thresholds import load_thresholds

    return load_thresholds()


def control_snr_db(cell) -> tuple[float, str]:
    """The control's SNR for a cell and where it comes from."""
    from harness.suites import optimize_label

    return _control_snr(_default_thresholds(), (cell.model, cell.dtype, cell.quant, cell.parallel),
                        (optimize_label(cell.optimize), cell.device, cell.size))


def _control_snr(thresholds, cell: tuple, labels: tuple) -> tuple[float, str]:
    """The SNR a control of `cell` (model, dtype, quant, parallel) must have under `thresholds`; labels: the rows'
    (optimize, device, size)."""
    from harness import schema

    floors = []
    for metric in ("single_step_sqnr_db", "final_latent_sqnr_db"):
        rule = thresholds.lookup((*cell, schema.ENGINE_VS_REFERENCE, metric), *labels)
        if rule is not None:
            floors.append(rule.value)
    if not floors:
        return CONTROL_FALLBACK_DB, f"no SQNR threshold for the cell: fixed {CONTROL_FALLBACK_DB} dB"
    snr = min(floors) - CONTROL_MARGIN_DB
    if snr > CONTROL_MAX_DB:
        return CONTROL_MAX_DB, (f"capped at {CONTROL_MAX_DB} dB (the cell's lowest SQNR floor {min(floors)} minus "
                                f"{CONTROL_MARGIN_DB} dB is past what a float64 cosine resolves)")
    return snr, f"{CONTROL_MARGIN_DB} dB below the cell's lowest SQNR floor {min(floors)}"


def perturb(ref: torch.Tensor, snr_db: float, seed: int) -> torch.Tensor:
    """ref + noise, per sample exactly orthogonal to ref and exactly snr_db below it, in float64."""
    r = ref.detach().to("cpu", torch.float64).reshape(ref.shape[0], -1)
    noise = torch.randn(r.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise -= (noise * r).sum(1, keepdim=True) / (r * r).sum(1, keepdim=True) * r
    noise *= (r.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)) * 10 ** (-snr_db / 20)
    return (r + noise).reshape(ref.shape)


def exact_values(snr_db: float) -> dict[str, float]:
    """What each control metric must read for orthogonal noise at snr_db: ||n|| / ||r|| = 10^(-snr/20)."""
    rel = 10 ** (-snr_db / 20)
    cos = 1 / math.sqrt(1 + rel * rel)
    return {"cosine": cos, "rel_error": rel, "sqnr_db": snr_db}


@dataclass
class Crosscheck:
    """Worst disagreement per sample, and what it was."""
    worst: np.ndarray
    what: list[str]

    def note(self, i: int, error: float, what: str) -> None:
        if not error <= self.worst[i]:  # NaN counts as the worst
            self.worst[i], self.what[i] = error, what


def add_rows(rows, test, ref, cell, seed: int) -> None:
    """The sweep's hook, once per cell x seed after the engine comparison: negative controls and cross-checks.
    `rows` is the sweep's row collector. The image metrics are called exactly as the run calls them (through
    harness.metrics), so a lenient one is caught by what it returns here."""
    from harness import metrics as M

    snr, why = control_snr_db(cell)
    check = Crosscheck(np.zeros(rows.n), [""] * rows.n)
    exact = exact_values(snr)
    functions = {"cosine": M.cosine, "rel_error": M.rel_error, "sqnr_db": M.sqnr_db}
    first = len(rows.rows)
    for prefix, tensor in (("single_step", ref.extras["single_step"]), ("final_latent", ref.final_latents)):
        control = perturb(tensor, snr, seed)
        for name, fn in functions.items():
            values = rows.add(NEGATIVE_CONTROL, f"{prefix}_{name}",
                              lambda fn=fn, control=control: fn(control, tensor, what=f"negative control {prefix}"))
            for i, v in enumerate(values if values is not None else []):
                check.note(i, abs(v - exact[name]) / max(abs(exact[name]), 1.0), f"{prefix}_{name} {v:.9g} vs exact "
                           f"{exact[name]:.9g}")
    for row in rows.rows[first:]:
        row["reason"] = row["reason"] or f"reference + orthogonal noise at {snr:.2f} dB ({why})"
        row["control_snr_db"] = snr
    _check_images(check, test.images, ref.images, {k: getattr(M, k) for k in ("psnr_db", "ssim", "mean_abs_diff")})
    rows.add(SELF_CHECK, CROSSCHECK_METRIC, lambda: check.worst)
    for row, what in zip(rows.rows[-rows.n:], check.what):
        row["reason"] = row["reason"] or (f"worst: {what}" if what else "all cross-checks agree")


def _check_images(check: Crosscheck, test: np.ndarray, ref: np.ndarray, image_metrics) -> None:
    t, r = np.asarray(test).astype(np.float64), np.asarray(ref).astype(np.float64)
    psnr, ssim, mad = (np.asarray(image_metrics[k](test, ref), dtype=np.float64) for k in ("psnr_db", "ssim",
                                                                                            "mean_abs_diff"))
    for i in range(len(t)):
        mse = float(((t[i] - r[i]) ** 2).mean())
        from harness.metrics import PSNR_CAP_DB
        own_psnr = PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0 ** 2 / mse))
        check.note(i, abs(psnr[i] - own_psnr) / own_psnr, f"psnr_db {psnr[i]:.6g} vs {own_psnr:.6g} from the MSE")
        own_mad = float(np.abs(t[i] - r[i]).mean())
        check.note(i, abs(mad[i] - own_mad) / max(own_mad, 1.0), f"mean_abs_diff {mad[i]:.6g} vs {own_mad:.6g}")
        identical = mse == 0
        consistent = (ssim[i] == 1.0) == identical and ssim[i] <= 1.0
        check.note(i, 0.0 if consistent else 1.0,
                   f"ssim {ssim[i]:.6g} for {'identical' if identical else 'different'} images")


# ---------------------------------------------------------------- the gate's side
def split(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows the thresholds judge, negative-control rows that selfcheck judges against the engine thresholds)."""
    control = results["comparison"].eq(NEGATIVE_CONTROL).fillna(False).astype(bool)
    return results[~control], results[control]


def _remade(r, thresholds, labels: tuple) -> tuple[float, str] | None:
    """(value, note) of a control row re-made for `thresholds`, or None when it was made for them. A run gated
    under floors other than the ones its sweep made its controls for (thresholds measured from that very run, or a
    --thresholds file) would otherwise judge controls at the wrong SNR, and report "cannot fail" for floors that can.
    The control's value at the SNR those floors ask for is exact_values(): the run's self_check rows showed the metric
    functions read exactly that (to ~1e-14) on its real tensors."""
    made = r.get("control_snr_db")
    if made is None or pd.isna(made) or r["status"] != "ok":
        return None
    snr, _ = _control_snr(thresholds, (r["model"], r["dtype"], r["quant"], r["parallel"]), labels)
    name = next((r["metric"][len(p):] for p in ("single_step_", "final_latent_") if r["metric"].startswith(p)), None)
    if abs(snr - float(made)) < 1e-9 or name not in ("cosine", "rel_error", "sqnr_db"):
        return None
    return exact_values(snr)[name], (f"re-made at {snr:.2f} dB for the thresholds in use (the run made it at "
                                     f"{made:.2f} dB)")


def judge_controls(controls: pd.DataFrame, thresholds) -> tuple[pd.DataFrame, list[str]]:
    """Each control row passes (as a control) only if the cell's engine threshold rejects it."""
    from harness import schema
    from harness.thresholds import ThresholdError

    out = controls.copy()
    thresholds_used, ops, passed, why, errors = [], [], [], [], []
    for i, r in controls.iterrows():
        key = (r["model"], r["dtype"], r["quant"], r["parallel"], schema.ENGINE_VS_REFERENCE, r["metric"])
        labels = tuple(r[c] if c in r and pd.notna(r[c]) else None for c in ("optimize", "device", "size"))
        try:
            rule = thresholds.lookup(key, *labels)
            remade = _remade(r, thresholds, labels)
        except ThresholdError as e:
            errors.append(str(e))
            rule = remade = None
        if remade is not None:
            out.loc[i, "value"], out.loc[i, "reason"] = remade[0], f"{remade[1]}; {r['reason']}"
            r = out.loc[i]
        value = float(r["value"]) if pd.notna(r["value"]) else math.nan
        thresholds_used.append(rule.value if rule else math.nan)
        ops.append(rule.op if rule else None)
        if r["status"] != "ok" or not math.isfinite(value):
            passed.append(False)
            why.append(f"negative control could not be computed: {r['reason']}")
        elif rule is None:
            passed.append(pd.NA)
            why.append("no engine threshold for the control to test")
        elif rule.passes(value):
            passed.append(False)
            why.append(f"negative control passed the engine threshold ({value:.6g} {rule.op} {rule.value:.6g}): "
                       "this threshold cannot fail")
        else:
            passed.append(True)
            why.append("")
    out["threshold"], out["op"] = thresholds_used, pd.Series(ops, index=out.index, dtype="str")
    out["passed"], out["why"] = pd.array(passed, dtype="boolean"), why
    return out, sorted(set(errors))


def extend(result, rows: pd.DataFrame, errors: list[str]):
    """Add self-check rows and errors to a GateResult."""
    if len(rows):
        result.rows = pd.concat([result.rows, rows], ignore_index=True) if len(result.rows) else rows
        result.rows["passed"] = result.rows["passed"].astype("boolean")
    result.errors += [e for e in errors if e not in result.errors]
    return result


def run_failures(results: pd.DataFrame, meta: dict, run_dir=None) -> tuple[pd.DataFrame, list[str]]:
    """(a) and (b) for a run folder: failing rows for missing results, errors for a foreign reference.
    Runs whose meta.json names no expected-rows file predate the self-checks and are gated without them."""
    import json
    from pathlib import Path

    if "expected_rows_file" not in meta:
        return pd.DataFrame(), []
    errors = provenance_errors(results)
    path = Path(run_dir or ".") / meta["expected_rows_file"]
    if not path.is_file():
        return pd.DataFrame(), errors + [f"{path}: the run's expected row counts are missing; cannot tell whether "
                                         "rows were dropped"]
    missing = missing_rows(results, json.loads(path.read_text()))
    rows = []
    for cell, comparison, metric, n, have in missing:
        template = results[results["cell"] == cell].head(1)
        base = template.iloc[0].to_dict() if len(template) else {"cell": cell}
        rows.append({**base, "comparison": comparison, "metric": metric, "value": float(have), "status": "ok",
                     "prompt_idx": pd.NA, "seed": pd.NA, "step": pd.NA, "reason": MISSING_ROWS,
                     "threshold": float(n), "op": ">=", "passed": False,
                     "why": f"{have} of {n} expected rows present: the run dropped results"})
    return pd.DataFrame(rows), errors
