"""Quieter model loading for the verbs that load models."""
from __future__ import annotations

import logging

# diffusers' advice, logged at every model it loads without `accelerate` (which the lock does not install: it changes
# nothing parity measures). It flooded every sweep log (13 times in a warm smoke sweep) and hid the lines that matter.
NO_ACCELERATE = "`accelerate` was not found"


class DropAccelerateAdvice(logging.Filter):
    """Drops that one message; every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return NO_ACCELERATE not in record.getMessage()


def quiet_loading() -> None:
    """Per-component progress bars drown the sweep log; called by the verbs that load models, never on import."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # Filters on a logger see only its own records, a handler's see every record propagated to it: diffusers logs
    # from per-module loggers to the handler on its library root logger.
    root = diffusers.utils.logging.get_logger("diffusers")
    for handler in root.handlers:
        if not any(isinstance(f, DropAccelerateAdvice) for f in handler.filters):
            handler.addFilter(DropAccelerateAdvice())
