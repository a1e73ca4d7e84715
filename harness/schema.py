"""The long-format results table: one row per cell x prompt x seed x comparison x metric (x step for
per-step metrics). Every writer and reader of results goes through these names."""
from __future__ import annotations

# What defines a cell. The gate keys thresholds on GATE_KEY below, and a threshold may also name the cell's
# `optimize` label (the engine's OptimizeSpec switches, "eager" when none is on) and its device kind ("cpu", "cuda";
# harness/thresholds.py), read from these columns.
CELL_COLUMNS = ("model", "dtype", "quant", "parallel", "device", "size", "backend", "optimize")
# Sample columns every family has. Each family's sampling object adds one column per field after the schema columns
# (harness.sweep.cell_columns reads them off the dataclass).
SAMPLE_COLUMNS = ("prompt_idx", "prompt", "seed", "steps", "height", "width")
MEASURE_COLUMNS = ("comparison", "metric", "step", "value", "status", "reason")
PROVENANCE_COLUMNS = (
    "run_id", "cell", "torch_version", "diffusers_version", "transformers_version", "parity_git",
    "model_hash", "clip_model", "clip_semantic",
)
# Per-cell facts about the model under test (bytes of transformer weights as stored, quantized share of linears).
MODEL_COLUMNS = ("weight_bytes", "quantized_fraction")
COLUMNS = ("run_id", "cell") + CELL_COLUMNS + SAMPLE_COLUMNS + MEASURE_COLUMNS + MODEL_COLUMNS + PROVENANCE_COLUMNS[2:]

# Keys a threshold is looked up by.
GATE_KEY = ("model", "dtype", "quant", "parallel", "comparison", "metric")

# Row status. Only "ok" rows carry a finite value; anything else fails the gate with its reason.
OK, INVALID, ERROR = "ok", "invalid", "error"
STATUSES = (OK, INVALID, ERROR)

# Comparisons: which two outputs a metric compares.
ENGINE_VS_REFERENCE = "engine_vs_reference"  # our engine vs a fresh diffusers run (implementation error)
REFERENCE_VS_GOLDEN = "reference_vs_golden"  # fresh diffusers vs the stored golden (reference drift)
ENGINE_VS_UNQUANTIZED = "engine_vs_unquantized"  # quant cell vs the same engine unquantized (quantization error)
PARALLEL_VS_SINGLE = "parallel_vs_single_device"  # parallel cell vs the same engine on one device
OPTIMIZED_VS_EAGER = "optimized_vs_eager"  # a cell with speed switches vs the same engine eager (the switches' error)
NEGATIVE_CONTROL = "negative_control"  # the reference perturbed at a known SNR: must fail the engine thresholds
SELF_CHECK = "self_check"  # metric cross-checks the run makes on itself (harness/selfcheck.py)
QUANT_ORACLE = "quant_oracle"  # each quantized linear vs torchao's reference of its scheme (harness/quant_oracle.py)
QUANT_LAYERS = "quant_layers"  # the layers left unquantized vs the ones asked for
COMPARISONS = (ENGINE_VS_REFERENCE, REFERENCE_VS_GOLDEN, ENGINE_VS_UNQUANTIZED, PARALLEL_VS_SINGLE,
               OPTIMIZED_VS_EAGER, NEGATIVE_CONTROL, SELF_CHECK, QUANT_ORACLE, QUANT_LAYERS)
