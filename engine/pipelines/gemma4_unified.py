"""Gemma 4 unified's engine record: a token family (engine.family.TokenFamily). The model and its loader live in
engine/models/gemma4_unified.py; there is no sampling loop beyond greedy decoding, which the model serves itself."""
from __future__ import annotations

from engine.family import TokenFamily
from engine.models import gemma4_unified

FAMILY = TokenFamily(name="gemma4-unified", transformers_architecture="Gemma4UnifiedForConditionalGeneration",
                     load=gemma4_unified.load)
