"""quiet_loading drops diffusers' accelerate advice, and only it: other warnings from diffusers' modules still show."""
import io
import logging

import diffusers.utils.logging
import pytest

from harness.quiet import NO_ACCELERATE, DropAccelerateAdvice, quiet_loading


@pytest.fixture
def diffusers_log():
    """A handler on diffusers' library root logger, as its own stderr handler is, present before quiet_loading."""
    root = diffusers.utils.logging.get_logger("diffusers")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root.addHandler(handler)
    quiet_loading()
    quiet_loading()  # idempotent: one filter per handler
    assert all(sum(isinstance(f, DropAccelerateAdvice) for f in h.filters) == 1 for h in root.handlers)
    yield [handler], buf
    root.removeHandler(handler)


def warn(text: str) -> None:
    diffusers.utils.logging.get_logger("diffusers.models.modeling_utils").warning(text)  # where diffusers logs it


def test_only_the_accelerate_advice_is_dropped(diffusers_log):
    _, buf = diffusers_log
    warn(f"Cannot initialize model with low cpu memory usage because {NO_ACCELERATE} in the environment.")
    warn("a real warning about the model")
    assert "a real warning about the model" in buf.getvalue()
    assert NO_ACCELERATE not in buf.getvalue()


def test_without_the_filter_the_advice_shows(diffusers_log):
    """The check above can fail: with the filter removed, the same record is written."""
    handlers, buf = diffusers_log
    removed = [(h, f) for h in handlers for f in list(h.filters) if isinstance(f, DropAccelerateAdvice)]
    for h, f in removed:
        h.removeFilter(f)
    try:
        warn(f"x {NO_ACCELERATE} y")
        assert NO_ACCELERATE in buf.getvalue()
    finally:
        for h, f in removed:
            h.addFilter(f)
