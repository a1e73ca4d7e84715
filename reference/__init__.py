"""Thin runners around the pinned diffusers pipelines, capturing what the harness compares."""
