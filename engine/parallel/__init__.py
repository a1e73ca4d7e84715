"""Sequence and CFG parallelism, applied to a built pipeline: process groups, Ulysses / ring / USP attention,
sequence sharding of the denoiser's inputs, CFG-parallel guidance. Model files never mention it.

Imports nothing at package import: engine.parallel.api.apply_parallel is the entry point."""
