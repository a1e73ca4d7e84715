import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def tiny_flux_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("flux1", "tiny", seed=0, root=zoo_root)
