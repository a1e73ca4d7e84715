"""Which layers to keep in bf16: measured quantization sensitivity and ignored-layer advice (`parity sensitivity`).

Every number comes from real forwards of the denoiser(s) on the suite's step-0 inputs against the unquantized
model, one forward per group and configuration (a group is one linear, one block, or one kind of linear across
blocks): (a) only that group quantized, (b) everything but that group quantized. Beside them, per linear: weight
SQNR, activation statistics of its captured inputs and its own output SQNR on them (one hooked forward per seed).

Advice: groups whose keeping in bf16 lowers the all-quantized error (mean 1 - cosine, which adds up over independent
error sources) are taken in order of error saved per byte kept in bf16, each prefix measured by a real forward, until
the worst chosen-seed cosine reaches the target; then every kept group that the target does not need is dropped
again. Greedy, so small rather than provably smallest. The list is checked on held-out seeds through the same
pattern resolution a run uses, and written as a ready --quant-ignored-layers argument and advice.json (which a suite
cell reads with quant_ignored_from).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from harness import metrics as M
from harness import schema
from harness.advice import load_advice  # noqa: F401  (read by suites through harness.advice)
from harness.provenance import model_hash as identity_of, versions

GROUPINGS = ("layer", "block", "kind")
ADVICE_JSON, RESULTS_PARQUET, SUMMARY_MD = "advice.json", "results.parquet", "summary.md"


@dataclass(frozen=True)
class SensitivityConfig:
    family: str
    quant: str
    model_dir: str | None = None  # None: weights synthesized on `device` by the zoo, inputs synthesized too
    size: str = "tiny"  # zoo size when synthesizing
    suite: str = "smoke"  # prompts, seeds (used to choose) and sampling settings
    group: str = "layer"
    target_cosine: float = 0.99
    holdout_seeds: tuple[int, ...] = ()  # () : as many seeds after the suite's largest
    device: str = "cpu"
    dtype: str = "bf16"
    height: int | None = None  # None: the suite's
    width: int | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.group not in GROUPINGS:
            raise ValueError(f"unknown --group {self.group!r}; valid: {list(GROUPINGS)}")
        if not 0.0 < self.target_cosine <= 1.0:
            raise ValueError(f"--target-cosine must be in (0, 1], got {self.target_cosine}")
        object.__setattr__(self, "holdout_seeds", tuple(self.holdout_seeds))


# --- groups -----------------------------------------------------------------------------------------------------------
def group_of(name: str, grouping: str) -> str:
    """A linear's group label: itself; its block (name up to the first numbered segment); or its kind (every
    numbered segment a wildcard: the same linear in every block)."""
    parts = name.split(".")
    if grouping == "layer":
        return name
    if grouping == "block":
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        return ".".join(parts[:digits[0] + 1]) if digits else name
    return ".".join("*" if p.isdigit() else p for p in parts)


def _candidate_patterns(layers, grouping: str) -> list[str]:
    """--quant-ignored-layers patterns in checkpoint names for a group: the block's common prefix, the kind's
    wildcarded names, or the layers' own names. The caller checks they reach exactly the group."""
    sources = sorted({s for layer in layers for s in layer.sources})
    if grouping == "block":
        split = [s.split(".") for s in sources]
        common = []
        for parts in zip(*split):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return [".".join(common)] if common and any(p.isdigit() for p in common) else sources
    if grouping == "kind":
        return sorted({".".join("*" if p.isdigit() else p for p in s.split(".")) for s in sources})
    return sources


@dataclass
class Group:
    label: str
    keys: frozenset  # (denoiser, engine name)
    patterns: tuple[str, ...]
    cost_bytes: int  # weight bytes that keeping it in bf16 adds to the all-quantized model
    error_only: float = float("nan")  # mean 1 - cosine with only this group quantized
    error_all_but: float = float("nan")  # ... with everything but this group quantized

    def saving(self, error_all: float) -> float:
        return error_all - self.error_all_but


def make_groups(probe, grouping: str) -> list[Group]:
    members: dict[str, list] = {}
    for layer in probe.layers:
        members.setdefault(group_of(layer.name, grouping), []).append(layer)
    everything = frozenset(layer.key for layer in probe.layers)
    groups = []
    for label, layers in members.items():
        keys = frozenset(layer.key for layer in layers)
        patterns = _candidate_patterns(layers, grouping)
        if probe.quantized_by(patterns) != everything - keys:
            patterns = _candidate_patterns(layers, "layer")
            if probe.quantized_by(patterns) != everything - keys:
                raise RuntimeError(f"no --quant-ignored-layers patterns reach exactly group {label}")
        cost = sum(layer.float_bytes - layer.quant_bytes for layer in layers)
        groups.append(Group(label, keys, tuple(patterns), cost))
    return groups


# --- measuring --------------------------------------------------------------------------------------------------------
class Session:
    """The probe, its captured calls and float outputs per seed, and the rows measured on them."""

    def __init__(self, probe, calls: dict[int, dict], prompts: tuple[str, ...], log: Callable[[str], None]):
        self.probe, self.calls, self.prompts, self.log = probe, calls, prompts, log
        probe.set_quantized(())
        self.refs = {seed: {d: probe.forward(d, call).detach() for d, call in by_d.items()}
                     for seed, by_d in calls.items()}
        self.rows: list[dict] = []
        self.forwards = 0

    def measure(self, keys, seeds, group: str, config: str, split: str) -> np.ndarray:
        """Quantize exactly `keys`, run every seed's denoiser calls, record cosine / SQNR / relative error per
        sample; return the cosines (NaN where a metric refused its input, which fails any target)."""
        self.probe.set_quantized(keys)
        cosines = []
        for seed in seeds:
            for d, call in self.calls[seed].items():
                out, ref = self.probe.forward(d, call), self.refs[seed][d]
                self.forwards += 1
                base = {"group": group, "config": config, "split": split, "seed": seed, "denoiser": d}
                for metric, fn in (("cosine", M.cosine), ("sqnr_db", M.sqnr_db), ("rel_error", M.rel_error)):
                    values = self._add(base, metric, lambda: fn(out, ref, what=f"{d} single-step output"),
                                       len(self.prompts))
                    if metric == "cosine":
                        cosines.append(values)
        return np.concatenate(cosines)

    def _add(self, base: dict, metric: str, compute, n: int) -> np.ndarray:
        try:
            values, status, reason = np.asarray(compute(), dtype=np.float64), schema.OK, ""
        except M.MetricError as e:
            values, status, reason = np.full(n, np.nan), schema.INVALID, str(e)
        for i, v in enumerate(values):
            self.rows.append({**base, "prompt_idx": i, "metric": metric, "value": float(v), "status": status,
                              "reason": reason})
        return values

    def static(self, group: str, layer: str, metric: str, value: float, seed=pd.NA, config="float") -> None:
        ok = np.isfinite(value)
        self.rows.append({"group": group, "layer": layer, "config": config, "split": "choose", "seed": seed,
                          "denoiser": "", "prompt_idx": pd.NA, "metric": metric,
                          "value": float(value), "status": schema.OK if ok else schema.INVALID,
                          "reason": "" if ok else f"{metric} is not finite"})


def error_of(cosines: np.ndarray) -> float:
    """Mean 1 - cosine; NaN (a refused output) is infinitely bad."""
    return float("inf") if np.isnan(cosines).any() else float(np.mean(1.0 - cosines))


def worst(cosines: np.ndarray) -> float:
    return float("-inf") if np.isnan(cosines).any() else float(cosines.min())


def weight_sqnr_db(ref, deq) -> float:
    """M.sqnr_db's definition and cap, computed in float64 where the weights are: a full-size model's 300 weights
    would otherwise each cross to the CPU as float64. NaN when either side is not finite (an invalid row)."""
    if not (bool(ref.isfinite().all()) and bool(deq.isfinite().all())):
        return float("nan")
    ref = ref.double()
    signal, noise = float(ref.pow(2).sum()), float((ref - deq.double()).pow(2).sum())
    if signal == 0:
        return float("nan")
    return M.SQNR_CAP_DB if noise == 0 else min(10 * np.log10(signal / noise), M.SQNR_CAP_DB)


def layer_rows(s: Session, grouping: str, seeds) -> None:
    """Per linear: weight SQNR; per seed: input activation statistics and the linear's own output SQNR."""
    probe = s.probe
    for layer in probe.layers:
        g = group_of(layer.name, grouping)
        s.static(g, layer.name, "weight_sqnr_db", weight_sqnr_db(*probe.weights(layer.key)), config="only")
        s.static(g, layer.name, "float_bytes", layer.float_bytes)
        s.static(g, layer.name, "quant_bytes", layer.quant_bytes, config="only")
    for seed in seeds:
        for d, call in s.calls[seed].items():
            stats = probe.layer_stats(d, call)
            for layer in probe.layers:
                if layer.denoiser != d:
                    continue
                st, g = stats[layer.name], group_of(layer.name, grouping)
                rms = (st["act_sq"] / st["act_n"]) ** 0.5
                s.static(g, layer.name, "act_amax", st["act_amax"], seed)
                s.static(g, layer.name, "act_crest", st["act_amax"] / rms if rms else float("nan"), seed)
                s.static(g, layer.name, "act_channel_outlier",
                         st["channel_rms_max"] / st["channel_rms_median"] if st["channel_rms_median"] else float("inf"),
                         seed)
                noise = st["out_error_energy"]
                s.static(g, layer.name, "layer_output_sqnr_db",
                         min(10 * np.log10(st["out_energy"] / noise), M.SQNR_CAP_DB) if noise else M.SQNR_CAP_DB,
                         seed, config="only")


def advise(s: Session, groups: list[Group], everything: frozenset, seeds, target: float) -> tuple[list[Group], dict]:
    """Greedy on error saved per byte kept, each prefix measured; then drop what the target does not need."""
    all_cos = s.measure(everything, seeds, "<all>", "all_quantized", "choose")
    error_all = error_of(all_cos)
    useful = [g for g in groups if g.saving(error_all) > 0]
    order = sorted(useful, key=lambda g: (-g.saving(error_all) / max(g.cost_bytes, 1), g.label))
    kept: list[Group] = []
    reached = worst(all_cos) >= target
    for step, g in enumerate(order if not reached else []):
        kept.append(g)
        cos = s.measure(everything - _keys(kept), seeds, "<advice>", f"greedy_{step + 1}", "choose")
        s.log(f"  keep {g.label}: worst cosine {worst(cos):.6f}")
        if worst(cos) >= target:
            reached = True
            break
    if reached:
        for g in sorted(kept, key=lambda g: g.saving(error_all) / max(g.cost_bytes, 1)):
            trial = [k for k in kept if k is not g]
            if trial and worst(s.measure(everything - _keys(trial), seeds, "<advice>", f"drop_{g.label}",
                                         "choose")) >= target:
                kept = trial
    return kept, {"error_all_quantized": error_all, "worst_all_quantized": worst(all_cos), "reached": reached}


def _keys(groups: list[Group]) -> frozenset:
    return frozenset().union(*(g.keys for g in groups)) if groups else frozenset()


# --- the run ----------------------------------------------------------------------------------------------------------
def _sampling(cfg: SensitivityConfig):
    from harness.suites import load_suite

    suite = load_suite(cfg.suite)
    cells = [c for c in suite.cells if c.model == cfg.family]
    if not cells:
        raise ValueError(f"suite {suite.name!r} has no {cfg.family!r} cell to take sampling settings from; "
                         f"its models: {sorted({c.model for c in suite.cells})}")
    holdout = cfg.holdout_seeds or tuple(max(suite.seeds) + 1 + i for i in range(len(suite.seeds)))
    if overlap := set(holdout) & set(suite.seeds):
        raise ValueError(f"held-out seeds {sorted(overlap)} are also the suite's seeds {list(suite.seeds)}")
    return suite, cells[0], holdout


def open_session(cfg: SensitivityConfig, log) -> tuple[Session, tuple, tuple, str]:
    from engine.api import RunConfig, sensitivity_probe, torch_dtype

    suite, cell, holdout = _sampling(cfg)
    height, width = cfg.height or cell.height, cfg.width or cell.width
    # The text length is a field of the family's sampling object where it has one (its name is the diffusers one).
    text_tokens = cfg.max_sequence_length or getattr(cell.sampling, "max_sequence_length", 512)
    sampling = cell.sampling
    if cfg.max_sequence_length and "max_sequence_length" in {f.name for f in dataclasses.fields(sampling)}:
        sampling = dataclasses.replace(sampling, max_sequence_length=cfg.max_sequence_length)
    run = RunConfig(family=cfg.family, model_dir=cfg.model_dir or "", prompts=suite.prompts, sampling=sampling,
                    steps=cell.steps, height=height, width=width, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant)
    seeds = tuple(suite.seeds) + tuple(holdout)
    if cfg.model_dir:
        probe = sensitivity_probe(run)
        calls = {seed: probe.capture(run.replace(seed=seed, quant="none")) for seed in seeds}
        model_hash = identity_of(cfg.model_dir)
    else:
        from harness import zoo

        def synthesize(denoiser: str):
            return (zoo.transformer_config(cfg.family, cfg.size, denoiser),
                    zoo.synthesize_transformer_state_dict(cfg.family, cfg.size, seed=0, device=cfg.device,
                                                          dtype=torch_dtype(cfg.dtype), denoiser=denoiser))

        probe = sensitivity_probe(run, synthesize)
        prompt_seeds = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:7], "little") for p in suite.prompts]
        calls = {seed: {d: probe.call_from(d, _cast(zoo.denoiser_inputs(
            cfg.family, cfg.size, d, prompt_seeds=prompt_seeds, seed=seed, height=height, width=width,
            text_tokens=text_tokens, sampling=cell.sampling), torch_dtype(cfg.dtype))) for d in probe.models}
            for seed in seeds}
        model_hash = f"zoo:{cfg.family}-{cfg.size}-seed0-v{zoo.ZOO_VERSION}-synthesized-on-{cfg.device}"
    return Session(probe, calls, suite.prompts, log), tuple(suite.seeds), tuple(holdout), model_hash


def _cast(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def run_sensitivity(cfg: SensitivityConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Measure, advise, verify; write results.parquet, summary.md and advice.json into out_dir (atomically: a
    temporary folder renamed when complete). Returns the advice."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} exists and is not empty")
    started = time.perf_counter()
    s, seeds, holdout, model_hash = open_session(cfg, log)
    probe = s.probe
    everything = frozenset(layer.key for layer in probe.layers)
    groups = make_groups(probe, cfg.group)
    log(f"{len(probe.layers)} quantizable linears in {len(groups)} groups ({cfg.group}); seeds {list(seeds)}, "
        f"held out {list(holdout)}")
    layer_rows(s, cfg.group, seeds)
    for g in groups:
        g.error_only = error_of(s.measure(g.keys, seeds, g.label, "only", "choose"))
        g.error_all_but = error_of(s.measure(everything - g.keys, seeds, g.label, "all_but", "choose"))
        s.static(g.label, "", "cost_bytes", g.cost_bytes)
    kept, found = advise(s, groups, everything, seeds, cfg.target_cosine)
    patterns = sorted({p for g in kept for p in g.patterns})
    advised = probe.quantized_by(patterns)  # what a run given these patterns quantizes
    if advised != everything - _keys(kept):
        raise RuntimeError("the advised patterns do not reach exactly the kept groups")
    choose_cos = s.measure(advised, seeds, "<advice>", "advised", "choose") if kept else None
    held_all = s.measure(everything, holdout, "<all>", "all_quantized", "holdout")
    held_adv = s.measure(advised, holdout, "<advice>", "advised", "holdout")
    nbytes = {}
    for name, keys in (("bf16", ()), ("all_quantized", everything), ("advised", advised)):
        probe.set_quantized(keys)
        nbytes[name] = probe.weight_bytes()
    error_all = found["error_all_quantized"]
    ranking = sorted(groups, key=lambda g: (-g.error_only, g.label))
    advice = {
        "family": cfg.family, "quant": cfg.quant, "model_hash": model_hash, "group": cfg.group,
        "target_cosine": cfg.target_cosine, "ignored": patterns, "kept_groups": [g.label for g in kept],
        "reached_on_chosen_seeds": found["reached"], "seeds": list(seeds), "holdout_seeds": list(holdout),
        "chosen_worst_cosine_all_quantized": found["worst_all_quantized"],
        "chosen_worst_cosine_advised": worst(choose_cos) if kept else found["worst_all_quantized"],
        "holdout_worst_cosine_all_quantized": worst(held_all), "holdout_worst_cosine_advised": worst(held_adv),
        "holdout_reached": worst(held_adv) >= cfg.target_cosine,
        "weight_bytes": nbytes, "bytes_kept_in_bf16": nbytes["advised"] - nbytes["all_quantized"],
        "bytes_saved_vs_bf16": {"all_quantized": nbytes["bf16"] - nbytes["all_quantized"],
                                "advised": nbytes["bf16"] - nbytes["advised"]},
        "ranking": [{"group": g.label, "error_only": g.error_only, "error_saved": g.saving(error_all),
                     "cost_bytes": g.cost_bytes} for g in ranking],
        "forwards": s.forwards, "seconds": round(time.perf_counter() - started, 1), "config": asdict(cfg),
    }
    _write(out_dir, cfg, s.rows, advice, model_hash)
    return advice


def _write(out_dir: Path, cfg: SensitivityConfig, rows: list[dict], advice: dict, model_hash: str) -> None:
    frame = pd.DataFrame(rows)
    frame["layer"] = frame.get("layer", pd.Series(dtype=object)).fillna("")
    for key, value in {"run_id": out_dir.name, "model": cfg.family, "size": cfg.size if not cfg.model_dir else "folder",
                       "dtype": cfg.dtype, "quant": cfg.quant, "device": cfg.device, "grouping": cfg.group,
                       "model_hash": model_hash, **versions()}.items():
        frame[key] = value
    frame["seed"] = frame["seed"].astype("Int64")
    frame["prompt_idx"] = frame["prompt_idx"].astype("Int64")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    frame.to_parquet(tmp / RESULTS_PARQUET, index=False)
    (tmp / ADVICE_JSON).write_text(json.dumps(advice, indent=2, default=str) + "\n")
    (tmp / SUMMARY_MD).write_text(summary(advice, frame))
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked before measuring)
    tmp.rename(out_dir)


def ignored_argument(advice: dict) -> str:
    return "--quant-ignored-layers " + " ".join(advice["ignored"]) if advice["ignored"] else "(nothing to ignore)"


def summary(advice: dict, frame: pd.DataFrame) -> str:
    nb, mb = advice["weight_bytes"], 1 / 2**20
    head = [
        f"# Quantization sensitivity: {advice['family']} {advice['quant']} (grouped by {advice['group']})", "",
        f"Target single-step cosine {advice['target_cosine']} (worst sample). Chosen on seeds {advice['seeds']}, "
        f"checked on held-out seeds {advice['holdout_seeds']}. {advice['forwards']} denoiser forwards, "
        f"{advice['seconds']} s.", "",
        "## Advice", "", "```", ignored_argument(advice), "```", "",
        "| | worst cosine, chosen seeds | worst cosine, held-out seeds | weight MiB |", "|---|---|---|---|",
        f"| bf16 | 1 | 1 | {nb['bf16'] * mb:.2f} |",
        f"| all quantized | {advice['chosen_worst_cosine_all_quantized']:.6f} | "
        f"{advice['holdout_worst_cosine_all_quantized']:.6f} | {nb['all_quantized'] * mb:.2f} |",
        f"| advised | {advice['chosen_worst_cosine_advised']:.6f} | {advice['holdout_worst_cosine_advised']:.6f} | "
        f"{nb['advised'] * mb:.2f} |", "",
        f"Bytes saved vs bf16: all quantized {advice['bytes_saved_vs_bf16']['all_quantized']:,}, advised "
        f"{advice['bytes_saved_vs_bf16']['advised']:,}; keeping the advised groups in bf16 costs "
        f"{advice['bytes_kept_in_bf16']:,} bytes over all-quantized. Target reached on held-out seeds: "
        f"**{'yes' if advice['holdout_reached'] else 'NO'}**.", "",
        "## Ranking (error with only this group quantized)", "",
        "| rank | group | 1 - cosine, only it quantized | error saved keeping it in bf16 | bytes to keep it | "
        "worst weight SQNR dB | worst own output SQNR dB | max channel outlier |", "|---|---|---|---|---|---|---|---|",
    ]
    per_group = frame[frame.layer != ""].groupby(["group", "metric"]).value
    lines = []
    for i, r in enumerate(advice["ranking"], 1):
        def stat(metric, how):
            try:
                return f"{getattr(per_group.get_group((r['group'], metric)), how)():.1f}"
            except KeyError:
                return ""
        lines.append(f"| {i} | `{r['group']}` | {r['error_only']:.3e} | {r['error_saved']:.3e} | {r['cost_bytes']:,} | "
                     f"{stat('weight_sqnr_db', 'min')} | {stat('layer_output_sqnr_db', 'min')} | "
                     f"{stat('act_channel_outlier', 'max')} |")
    return "\n".join(head + lines) + "\n"


def default_out(cfg: SensitivityConfig, root: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return root / f"{stamp}-sensitivity-{cfg.family}-{cfg.quant}-{cfg.group}"


