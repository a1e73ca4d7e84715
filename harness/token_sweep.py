"""Sweeps of token families (multimodal language models, engine.family.TokenFamily): the engine's embedder outputs,
logits and greedy continuations against the family's transformers reference, as token-logits metrics in the same
long-format results table, gated by the same gate and thresholds (golden/thresholds.toml) as every other run.

A token suite is TOML data with `kind = "token-logits"` (harness/suites/<name>.toml): the family, greedy length,
seeds, prompts (text with `{image}` / `{audio}` where each medium goes, the image sizes and waveform lengths that
the seed draws) and the cells (dtype x quant modes). The media are synthetic: an image of H x W uint8 pixels and a
waveform in [-1, 1], drawn from the seed and the prompt index, so a run is a pure function of the suite.

    parity-token run:  run(suite, out_dir) -> (exit code, results); `python -m harness.token_sweep --suite NAME`
Generic: names no family (families come from engine.api and reference.registry's token registries).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from engine import api
from harness import token_metrics as T
from harness.metrics import MetricError
from harness.schema import COLUMNS, ENGINE_VS_REFERENCE, ERROR, INVALID, OK

KIND = "token-logits"
SUITES_DIR = Path(__file__).resolve().parent / "suites"
# metric -> (the output it compares, the function); embedder metrics run once per embedder the prompt uses.
EMBEDDER_METRICS = {"embedder_cosine_min": T.rows_cosine_min, "embedder_rel_error": T.rel_error}
LOGITS_METRICS = {"logits_cosine_min": T.logits_cosine_min, "top1_agreement": T.top1_agreement,
                  "next_token_kl_max": T.next_token_kl_max}
GREEDY_METRIC = ("greedy_match_rate", T.greedy_match_rate)


class TokenSuiteError(ValueError):
    """The suite file is malformed; the message names the problem and the valid choices."""


@dataclass(frozen=True)
class TokenPrompt:
    text: str  # `{image}` and `{audio}` mark where each medium goes, in order
    images: tuple[tuple[int, int], ...] = ()  # (height, width) of each image
    audio: tuple[int, ...] = ()  # samples of each waveform

    def embedders(self) -> tuple[str, ...]:
        return (("image_embedder",) if self.images else ()) + (("audio_embedder",) if self.audio else ())


@dataclass(frozen=True)
class TokenCell:
    model: str
    size: str
    dtype: str
    quant: str
    device: str = "cpu"

    @property
    def name(self) -> str:
        return f"{self.model}/{self.size}/{self.dtype}/{self.quant}/sp1/{self.device}"


@dataclass(frozen=True)
class TokenSuite:
    name: str
    prompts: tuple[TokenPrompt, ...]
    cells: tuple[TokenCell, ...]
    seeds: tuple[int, ...] = (0,)
    greedy_tokens: int = 16


def is_token_suite(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and tomllib.loads(path.read_text()).get("kind") == KIND


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    return path if path.suffix == ".toml" else SUITES_DIR / f"{name_or_path}.toml"


def load_suite(name_or_path: str) -> TokenSuite:
    path = suite_path(name_or_path)
    if not path.is_file():
        raise TokenSuiteError(f"no suite file {path}")
    data = tomllib.loads(path.read_text())
    if data.get("kind") != KIND:
        raise TokenSuiteError(f"{path} is not a {KIND!r} suite (kind = {data.get('kind')!r})")
    families = api.token_family_names()
    prompts, cells = [], []
    for p in data.get("prompts", []):
        prompt = TokenPrompt(p["text"], tuple(tuple(hw) for hw in p.get("images", [])), tuple(p.get("audio", [])))
        if prompt.text.count("{image}") != len(prompt.images) or prompt.text.count("{audio}") != len(prompt.audio):
            raise TokenSuiteError(f"{path}: prompt {prompt.text!r} marks {prompt.text.count('{image}')} images and "
                                  f"{prompt.text.count('{audio}')} waveforms but lists {len(prompt.images)} and "
                                  f"{len(prompt.audio)}")
        prompts.append(prompt)
    for c in data.get("cells", []):
        if c["model"] not in families:
            raise TokenSuiteError(f"{path}: unknown token family {c['model']!r}; valid: {families}")
        for quant in c.get("quant", ["none"]):
            if quant not in api.quant_modes():
                raise TokenSuiteError(f"{path}: unknown quant mode {quant!r}; valid: {list(api.quant_modes())}")
            cells.append(TokenCell(c["model"], c.get("size", "tiny"), c.get("dtype", "fp32"), quant,
                                   c.get("device", "cpu")))
    if not prompts or not cells:
        raise TokenSuiteError(f"{path}: a token suite needs [[prompts]] and [[cells]]")
    return TokenSuite(data.get("name", path.stem), tuple(prompts), tuple(cells), tuple(data.get("seeds", [0])),
                      int(data.get("greedy_tokens", 16)))


# --- media and outputs ----------------------------------------------------------------------------------------------
def media(prompt: TokenPrompt, prompt_idx: int, seed: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """The prompt's synthetic images (3, H, W) uint8 and waveforms (float32 in [-1, 1]), from (seed, prompt_idx)."""
    g = torch.Generator().manual_seed(seed * 1000 + prompt_idx)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in prompt.images]
    rng = np.random.default_rng([seed, prompt_idx])
    waves = [np.clip(0.3 * rng.standard_normal(n), -1, 1).astype(np.float32) for n in prompt.audio]
    return images, waves


def _text(reference, prompt: TokenPrompt) -> str:
    proc = reference.processor
    return prompt.text.replace("{image}", proc.image_token).replace("{audio}", proc.audio_token)


class References:
    """The reference's outputs per (model dir, dtype, prompt, seed), computed once per sweep."""

    def __init__(self, family: str):
        from reference.registry import token_reference

        self.cls = token_reference(family)
        self.runners: dict = {}
        self.outputs: dict = {}

    def get(self, model_dir: Path, dtype: str, prompt_idx: int, prompt: TokenPrompt, seed: int, n: int):
        runner = self.runners.get((model_dir, dtype))
        if runner is None:
            runner = self.runners[(model_dir, dtype)] = self.cls(model_dir, api.torch_dtype(dtype))
        key = (model_dir, dtype, prompt_idx, seed, n)
        if key not in self.outputs:
            images, waves = media(prompt, prompt_idx, seed)
            encoded = runner.encode(_text(runner, prompt), images, waves)
            self.outputs[key] = (encoded["engine"], runner.run(encoded["reference"], n))
        return self.outputs[key]


# --- rows -----------------------------------------------------------------------------------------------------------
def _row(cell: TokenCell, run_id: str, prompt_idx, prompt_text, seed, metric, value, status=OK, reason=None,
         layer=None, **extra) -> dict:
    return {"run_id": run_id, "cell": cell.name, "model": cell.model, "dtype": cell.dtype, "quant": cell.quant,
            "parallel": "sp1", "device": cell.device, "size": cell.size, "backend": "engine", "optimize": "eager",
            "prompt_idx": prompt_idx, "prompt": prompt_text, "seed": seed, "comparison": ENGINE_VS_REFERENCE,
            "metric": metric, "value": value, "status": status, "reason": reason, "layer": layer, **extra}


def _measure(fn, test, ref, what: str) -> tuple[float, str, str | None]:
    try:
        return fn(test, ref, what=what), OK, None
    except MetricError as e:
        return float("nan"), INVALID, str(e)


def cell_rows(cell: TokenCell, suite: TokenSuite, model_dir: Path, refs: References, run_id: str, log) -> list[dict]:
    rows: list[dict] = []
    try:
        model = api.open_token_model(cell.model, model_dir, cell.dtype, cell.quant, cell.device)
        facts = {"weight_bytes": api.quant_summary(model)["weight_bytes"],
                 "quantized_fraction": api.quant_summary(model)["quantized_param_fraction"]}
    except Exception as e:  # one failing cell never takes down a sweep: its error row fails the gate
        return [_row(cell, run_id, None, None, None, "cell", float("nan"), ERROR,
                     f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")]
    n = suite.greedy_tokens
    for prompt_idx, prompt in enumerate(suite.prompts):
        for seed in suite.seeds:
            where = dict(prompt_idx=prompt_idx, prompt_text=prompt.text, seed=seed)
            try:
                inputs, ref = refs.get(model_dir, cell.dtype, prompt_idx, prompt, seed, n)
            except Exception as e:
                rows.append(_row(cell, run_id, **where, metric="reference", value=float("nan"), status=ERROR,
                                 reason=f"{type(e).__name__}: {e}", **facts))
                continue
            # Each output on its own: a crash in one (a placement count mismatch in the logits) leaves the others'
            # metrics standing, so the rows say which part broke.
            outs: dict = {}
            for output, compute in (("embedders", lambda: model.embedders(inputs)),
                                    ("logits", lambda: {"logits": model.logits(inputs)}),
                                    ("greedy", lambda: {"greedy": model.greedy(inputs, n)})):
                try:
                    with torch.no_grad():
                        outs.update(compute())
                except Exception as e:
                    rows.append(_row(cell, run_id, **where, metric=output, value=float("nan"), status=ERROR,
                                     reason=f"{type(e).__name__}: {e}", **facts))
            for name in (n for n in prompt.embedders() if n in outs):
                for metric, fn in EMBEDDER_METRICS.items():
                    value, status, reason = _measure(fn, outs.get(name), ref.get(name), name)
                    rows.append(_row(cell, run_id, **where, metric=metric, value=value, status=status,
                                     reason=reason, layer=name, **facts))
            for metric, fn in LOGITS_METRICS.items() if "logits" in outs else ():
                value, status, reason = _measure(fn, outs["logits"], ref["logits"], "logits")
                rows.append(_row(cell, run_id, **where, metric=metric, value=value, status=status, reason=reason,
                                 **facts))
            if "greedy" in outs:
                value, status, reason = _measure(GREEDY_METRIC[1], outs["greedy"], ref["greedy"], "greedy tokens")
                rows.append(_row(cell, run_id, **where, metric=GREEDY_METRIC[0], value=value, status=status,
                                 reason=reason, **facts))
    log(f"  {cell.name}: {len(rows)} rows")
    return rows


def expected_rows(suite: TokenSuite) -> int:
    """Rows one cell must produce: per prompt and seed, 2 per embedder it uses, 3 logits metrics, 1 greedy."""
    return sum((2 * len(p.embedders()) + 4) * len(suite.seeds) for p in suite.prompts)


def sweep(suite: TokenSuite, model_dirs: dict[str, Path] | None = None, zoo_root: str | Path = ".zoo",
          run_id: str = "token", refs: dict | None = None, log=print) -> pd.DataFrame:
    """Every cell of the suite as long-format rows. `refs`: a dict shared between sweeps of one process (family ->
    References) so that repeated runs (selftest) compute the reference once."""
    from harness import provenance, zoo

    refs = {} if refs is None else refs
    rows: list[dict] = []
    for cell in suite.cells:
        model_dir = Path((model_dirs or {}).get(cell.model) or zoo.cached_build(cell.model, cell.size, 0, zoo_root))
        family_refs = refs.setdefault(cell.model, References(cell.model))
        got = cell_rows(cell, suite, model_dir, family_refs, run_id, log)
        if not any(r["status"] == ERROR for r in got) and len(got) != expected_rows(suite):
            got.append(_row(cell, run_id, None, None, None, "rows", float("nan"), ERROR,
                            f"{len(got)} rows, expected {expected_rows(suite)}: the cell dropped results"))
        for r in got:
            r["model_hash"] = provenance.model_hash(model_dir)
        rows += got
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    df["steps"] = suite.greedy_tokens  # the greedy length: the token families' only "steps"
    for key, value in provenance.versions().items():
        df[key] = value
    return df


def run(suite: TokenSuite, out_dir: str | Path, *, model_dirs=None, zoo_root=".zoo", thresholds=None,
        refs: dict | None = None, log=print) -> tuple[int, pd.DataFrame]:
    """Sweep, write the run folder (results.parquet/csv, meta.json, summary.md, report.html, junit.xml), gate it;
    returns (exit code 0 pass / 1 fail / 2 error, results)."""
    from harness.runfiles import write_run
    from harness.verdict import gate_run_dir

    out_dir = Path(out_dir)
    started = time.perf_counter()
    results = sweep(suite, model_dirs, zoo_root, out_dir.name, refs, log)
    meta = {"suite": suite.name, "kind": KIND, "run_id": out_dir.name, "cells": [c.name for c in suite.cells],
            "seeds": list(suite.seeds), "greedy_tokens": suite.greedy_tokens,
            "prompts": [dataclasses.asdict(p) for p in suite.prompts],
            "seconds": round(time.perf_counter() - started, 1)}
    write_run(out_dir, results, meta)
    return gate_run_dir(out_dir, thresholds, baseline=None), results


# --- selftest: every planted bug of the suite's families must fail the gate ----------------------------------------
def selftest(suite: TokenSuite, only: list[str] | None = None, zoo_root=".zoo", thresholds=None, model_dirs=None,
             refs: dict | None = None, log=print) -> tuple[int, pd.DataFrame]:
    """Run the suite clean (it must pass), then once per plant of the suite's families on the cells the plant
    names, gating each run in memory. Returns (0 every plant caught / 1 one escaped / 2 the clean run fails, one row
    per plant: caught, and which metrics caught it or the error it raised). The reference runs once."""
    from harness.gate import gate
    from harness.selftest import CATALOGUE, install
    from harness.thresholds import load_thresholds

    rules = load_thresholds(thresholds)
    plants = [p for p in CATALOGUE.values() if any(p.runs_on(c) for c in suite.cells)
              and (not only or any(pat in p.name for pat in only))]
    if not plants:
        raise TokenSuiteError(f"no plant runs on suite {suite.name!r}'s cells (--only {only})")
    refs = {} if refs is None else refs
    quiet = lambda msg: None  # noqa: E731

    def judged(cells, run_id):
        results = sweep(dataclasses.replace(suite, cells=cells), model_dirs, zoo_root, run_id, refs, quiet)
        from harness.runfiles import normalize
        return gate(normalize(results), rules)

    cells_of = {p.name: tuple(c for c in suite.cells if p.runs_on(c)) for p in plants}
    clean = judged(tuple(dict.fromkeys(c for cs in cells_of.values() for c in cs)), "selftest-clean")
    if clean.exit_code != 0:
        log(f"selftest: the clean run does not pass ({clean.verdict}); nothing to learn from the plants")
        return 2, pd.DataFrame()
    rows = []
    for plant in plants:
        undo = install(plant.name)
        try:
            result = judged(cells_of[plant.name], f"selftest-{plant.name}")
        finally:
            undo()
        failed = result.failed
        caught_by = sorted(set(failed["metric"].astype(str))) if len(failed) else []
        reasons = sorted(set(failed.loc[failed["status"] != OK, "reason"].dropna().astype(str).str[:120]))
        rows.append({"plant": plant.name, "breaks": plant.breaks, "caught": result.exit_code != 0,
                     "caught_by": ", ".join(caught_by), "errors": " | ".join(reasons)})
        log(f"  {plant.name}: {'CAUGHT' if result.exit_code else 'ESCAPED'} by {', '.join(caught_by) or '-'}")
    matrix = pd.DataFrame(rows)
    return (0 if matrix["caught"].all() else 1), matrix


def _model_dirs(pairs) -> dict[str, Path]:
    pairs = list(pairs or [])
    families = api.token_family_names()
    if any("=" not in kv or kv.split("=", 1)[0] not in families for kv in pairs):
        raise TokenSuiteError(f"--model-dir takes FAMILY=PATH with FAMILY one of {families}; got {pairs}")
    return {k: Path(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def sweep_from_cli(args, out_root: Path) -> int:
    """`parity sweep --suite <token suite>`: the options that apply to a token suite (--out, --run-id, --model-dir,
    --zoo-root, --thresholds); the diffusion-only ones are refused rather than ignored."""
    ignored = [f"--{k.replace('_', '-')}" for k in ("device", "cells", "quant_ignored_layers", "shard", "resume")
               if getattr(args, k, None)]
    if ignored:
        raise TokenSuiteError(f"{', '.join(ignored)} do not apply to token-logits suite {args.suite!r}; valid "
                              "options: --out --run-id --model-dir --zoo-root --thresholds")
    suite = load_suite(args.suite)
    out = Path(out_root) / (args.run_id or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{suite.name}")
    code, _ = run(suite, out, model_dirs=_model_dirs(args.model_dir), zoo_root=args.zoo_root or ".zoo",
                  thresholds=args.thresholds)
    return code


def selftest_from_cli(args) -> int:
    """`parity selftest --suite <token suite>`: prints the plant matrix, writes it to --out/<time>-<suite>/."""
    from harness.runfiles import markdown_table

    suite = load_suite(args.suite)
    code, matrix = selftest(suite, args.only, args.zoo_root or ".zoo")
    print(matrix.to_string(index=False) if len(matrix) else "selftest: the clean run does not pass")
    if len(matrix):
        out = Path(args.out) / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{suite.name}"
        out.mkdir(parents=True, exist_ok=False)
        matrix.to_parquet(out / "detection.parquet", index=False)
        (out / "detection.md").write_text(f"# parity selftest: {int(matrix.caught.sum())} of {len(matrix)} plants "
                                          f"caught ({suite.name})\n\n" + markdown_table(matrix) + "\n")
        print(f"detection matrix: {out}/detection.parquet, {out}/detection.md")
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.token_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, help="a token-logits suite name or TOML path")
    ap.add_argument("--out", default=None, help="run folder (default reports/<time>-<suite>)")
    ap.add_argument("--zoo-root", default=".zoo")
    ap.add_argument("--thresholds", default=None)
    ap.add_argument("--model-dir", action="append", default=[], metavar="FAMILY=PATH")
    ap.add_argument("--selftest", action="store_true", help="plant every bug of the suite's families, gate each")
    ap.add_argument("--only", nargs="+", help="with --selftest: only plants whose name contains one of these")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the tiny zoo's ops ran 24x slower with 2 threads on a busy "
                         "2-core machine, measured; raise it for full-size models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        suite = load_suite(args.suite)
        dirs = _model_dirs(args.model_dir)
    except (TokenSuiteError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.selftest:
        code, matrix = selftest(suite, args.only, args.zoo_root, args.thresholds, dirs)
        print(matrix.to_string(index=False) if len(matrix) else "selftest: not run")
        print("SELFTEST PASS: every plant caught" if code == 0 else "SELFTEST FAIL" if code == 1 else
              "SELFTEST ERROR")
        return code
    out = Path(args.out or f"reports/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{suite.name}")
    code, _ = run(suite, out, model_dirs=dirs, zoo_root=args.zoo_root, thresholds=args.thresholds)
    return code


if __name__ == "__main__":
    sys.exit(main())
