"""The long-format results table: one row per cell x prompt x seed x comparison x metric (x step for
per-step metrics). Every writer and reader of results goes through these names."""
from __future__ import annotations

# What defines a cell: the gate keys thresholds on the first five plus comparison and metric.
CELL_COLUMNS = ("model", "dtype", "quant", "parallel", "device", "size", "backend")
SAMPLE_COLUMNS = ("prompt_idx", "prompt", "seed", "steps", "height", "width", "guidance", "true_cfg_scale")
MEASURE_COLUMNS = ("comparison", "metric", "step", "value", "status", "reason")
PROVENANCE_COLUMNS = (
    "run_id", "cell", "torch_version", "diffusers_version", "transformers_version", "parity_git",
    "model_hash", "clip_model", "clip_semantic",
)
COLUMNS = ("run_id", "cell") + CELL_COLUMNS + SAMPLE_COLUMNS + MEASURE_COLUMNS + PROVENANCE_COLUMNS[2:]

# Keys a threshold is looked up by.
GATE_KEY = ("model", "dtype", "quant", "parallel", "comparison", "metric")

# Row status. Only "ok" rows carry a finite value; anything else fails the gate with its reason.
OK, INVALID, ERROR = "ok", "invalid", "error"
STATUSES = (OK, INVALID, ERROR)

# Comparisons: which two outputs a metric compares.
ENGINE_VS_REFERENCE = "engine_vs_reference"  # our engine vs a fresh diffusers run (implementation error)
REFERENCE_VS_GOLDEN = "reference_vs_golden"  # fresh diffusers vs the stored golden (reference drift)
COMPARISONS = (ENGINE_VS_REFERENCE, REFERENCE_VS_GOLDEN)
