"""The model identity that keys goldens, caches and report rows: it follows the tensors and the numerics-relevant
config, never the version stamps libraries write into the folders they save. And when a library upgrade does move
the reference, the drift rows and the gate message name the versions."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
import diffusers.configuration_utils
import transformers
import transformers.configuration_utils
from harness import schema
from harness.gate import gate
from harness.golden import Golden, GoldenMissing, load_golden, save_golden
from harness.provenance import model_hash, versions
from harness.sweep import Rows, compare_golden
from harness.thresholds import parse_thresholds
from harness.zoo import build

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _stamped_files(folder) -> dict[str, str]:
    """Every JSON file of the folder that carries a library version stamp, with its text."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.json"))
            if "_version" in p.read_text()}


def test_same_model_under_other_library_versions_has_one_hash(tmp_path, monkeypatch):
    first = build("flux1", tmp_path / "a", "tiny", seed=0)
    # What another machine's libraries would write: every writer stamps its own version.
    monkeypatch.setattr(diffusers.configuration_utils, "__version__", "0.99.0")
    monkeypatch.setattr(transformers.configuration_utils, "__version__", "9.1.0")
    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    monkeypatch.setattr(torch, "__version__", "3.0.0")
    monkeypatch.setattr(transformers, "__version__", "9.1.0")
    second = build("flux1", tmp_path / "b", "tiny", seed=0)

    a, b = _stamped_files(first), _stamped_files(second)
    assert a.keys() == b.keys() and a != b, "the two builds should differ in their version stamps"
    assert any('"0.99.0"' in text for text in b.values()) and any('"9.1.0"' in text for text in b.values())
    assert model_hash(first) == model_hash(second)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("flux1", tmp_path_factory.mktemp("identity") / "m", "tiny", seed=0)


def _copy(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "copy")


def test_one_changed_weight_changes_the_hash(tiny, tmp_path):
    copy = _copy(tiny, tmp_path)
    path = copy / TRANSFORMER_WEIGHTS
    tensors = load_file(str(path))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] += 1e-3
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert model_hash(copy) != model_hash(tiny)


def test_a_numerics_config_value_changes_the_hash(tiny, tmp_path):
    copy = _copy(tiny, tmp_path)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["shift"] = config["shift"] + 0.5
    path.write_text(json.dumps(config))
    assert model_hash(copy) != model_hash(tiny)


def test_writer_metadata_tensor_order_and_docs_do_not(tiny, tmp_path):
    copy = _copy(tiny, tmp_path)
    path = copy / TRANSFORMER_WEIGHTS
    tensors = load_file(str(path))
    reordered = dict(reversed(list(tensors.items())))
    save_file(reordered, str(path), metadata={"format": "pt", "writer": "another tool 1.2"})
    (copy / "README.md").write_text("# a model card\n")
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert model_hash(copy) == model_hash(tiny)


# --- goldens: a changed model is named as such; changed libraries are named in the drift rows ------------------

def _artifacts():
    class A:  # the two fields compare_golden reads
        final_latents = torch.linspace(-1, 1, 2 * 8 * 4).reshape(2, 8, 4)
        images = np.full((2, 1, 8, 8, 3), 100, dtype=np.uint8)  # (B, F, H, W, 3)
    return A()


def test_golden_of_another_model_says_the_model_changed(tmp_path):
    art = _artifacts()
    path = tmp_path / "seed0.safetensors"
    save_golden(path, art.final_latents, art.images, model_hash="aaaa")
    with pytest.raises(GoldenMissing, match="weights or a numerics-relevant config value differ"):
        load_golden(path, "bbbb")
    golden = load_golden(path, "aaaa")
    assert golden.versions == {k: v for k, v in versions().items() if k != "parity_git"}


def _drift_rows(golden: Golden, art) -> pd.DataFrame:
    rows = Rows({"model": "flux1", "dtype": "fp32", "quant": "none", "parallel": "sp1", "seed": 0}, 2, ("p0", "p1"))
    compare_golden(rows, art, golden)
    return pd.DataFrame(rows.rows)


def test_drift_rows_carry_both_version_sets_and_the_gate_names_the_upgrade():
    art = _artifacts()
    old = {"torch_version": "2.0.0", "diffusers_version": "0.1.0", "transformers_version": versions()["transformers_version"]}
    moved = art.final_latents.clone()
    moved[1] = -moved[1]  # sample 1 drifted far
    frame = _drift_rows(Golden(moved, art.images, old), art)
    assert set(frame.comparison) == {schema.REFERENCE_VS_GOLDEN}
    assert (frame.golden_torch_version == "2.0.0").all() and (frame.golden_diffusers_version == "0.1.0").all()
    assert (frame.reason.str.contains(f"torch 2.0.0 -> {versions()['torch_version']}")).all()
    assert not frame.reason.str.contains("transformers").any()  # only what moved is named

    for key, value in versions().items():
        frame[key] = value
    rules = parse_thresholds({"threshold": [
        {"model": "*", "dtype": "*", "quant": "*", "parallel": "*", "comparison": schema.REFERENCE_VS_GOLDEN,
         "metric": m, "op": ">=", "value": v, "source": "test"} for m, v in (("final_latent_cosine", 0.99),
                                                                               ("psnr_db", 30.0))]})
    result = gate(frame, rules)
    failed = result.failed
    assert list(failed.metric) == ["final_latent_cosine"] and list(failed.prompt_idx) == [1]
    assert "library versions differ" in failed.why.iloc[0] and "torch 2.0.0 ->" in failed.why.iloc[0]


def test_drift_rows_under_the_goldens_own_versions_carry_no_note():
    art = _artifacts()
    golden = Golden(art.final_latents, art.images, {k: v for k, v in versions().items() if k != "parity_git"})
    frame = _drift_rows(golden, art)
    assert (frame.reason == "").all() and (frame.value.iloc[0] == pytest.approx(1.0))
