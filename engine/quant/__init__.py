"""Quantized linears: format math (formats/), the module (linear.py), and the walk that applies them (api.py)."""
