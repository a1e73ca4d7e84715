"""Quieter model loading for the verbs that load models."""
from __future__ import annotations


def quiet_loading() -> None:
    """Per-component progress bars drown the sweep log; called by the verbs that load models, never on import."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
