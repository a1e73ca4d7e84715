"""parity selftest: a catalogue of planted bugs, installed from outside the product and run through the sweep and
the gate by harness.selftest.runner. Each catalogue is a family's own file (it also plants the harness's own bugs,
on that family's cells); this module is the registry line."""
from harness.selftest.flux1 import CATALOGUE, TARGETS, Patcher, Plant, install, plant, sitecustomize_source

__all__ = ["CATALOGUE", "TARGETS", "Patcher", "Plant", "install", "plant", "sitecustomize_source"]
