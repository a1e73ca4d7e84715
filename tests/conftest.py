import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub


@pytest.fixture(scope="session", autouse=True)
def ref_cache_root(tmp_path_factory):
    """Sweeps in tests keep their reference cache to the session: never the developer's .cache/reference."""
    before = os.environ.get("PARITY_REF_CACHE")
    os.environ["PARITY_REF_CACHE"] = str(tmp_path_factory.mktemp("ref-cache"))
    yield os.environ["PARITY_REF_CACHE"]
    if before is None:
        os.environ.pop("PARITY_REF_CACHE")
    else:
        os.environ["PARITY_REF_CACHE"] = before


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def tiny_flux_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("flux1", "tiny", seed=0, root=zoo_root)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny ops: on a shared 2-core machine OpenMP spin-waits made them 20-50x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_ci_step_summary(monkeypatch):
    """The gate appends to $GITHUB_STEP_SUMMARY; the test suite's own synthetic gates must not land on CI's page."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
