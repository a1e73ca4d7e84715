"""`parity quantize` on a Qwen-Image folder: the denoiser folders come from the family record (model_index.json's
pipeline class), every other component is carried over byte for byte, and the checkpoint loads to exactly the
weights online quantization of the source folder gives."""
import json

import pytest
import torch

from engine.loading import read_config
from engine.models.qwen_image import QwenImageConfig, QwenImageTransformer, diffusers_key_map
from engine.quant.api import QuantSpec, build_transformer, dequantized_weights, quant_summary
from harness import quantize as tool

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_qwen_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("qwen-image", "tiny", seed=0, root=zoo_root)


def _load(folder, mode):
    cfg = QwenImageConfig.from_diffusers(read_config(folder / "transformer"))
    return build_transformer(lambda: QwenImageTransformer(cfg), diffusers_key_map(cfg), folder / "transformer",
                             QuantSpec(mode), torch.float32, "cpu")


def test_qwen_folder_quantizes_to_the_weights_of_online_quantization(tiny_qwen_dir, tmp_path):
    out = tool.quantize_folder(tiny_qwen_dir, "nvfp4", tmp_path / "q")
    for src in tiny_qwen_dir.rglob("*"):
        rel = src.relative_to(tiny_qwen_dir)
        if src.is_file() and rel.parts[0] != "transformer":
            assert (out / rel).read_bytes() == src.read_bytes(), rel
    quant = json.loads((out / "transformer" / tool.CONFIG_NAME).read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4"
    from_ckpt, online = _load(out, "nvfp4"), _load(tiny_qwen_dir, "nvfp4")
    assert quant_summary(from_ckpt) == quant_summary(online) and quant_summary(online)["quantized_param_fraction"] > 0.5
    want, got = dequantized_weights(online), dequantized_weights(from_ckpt)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(got[name], want[name]), name
