"""harness/quantize.py writes pre-quantized folders; engine.quant.api.build_transformer loads them (and ModelOpt /
Ideogram-style variants of them) to the same weights online quantization gives."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.loading import CheckpointError, read_checkpoint, read_config
from engine.models.flux1 import Flux1Config, Flux1Transformer, diffusers_key_map
from engine.quant.api import QuantSpec, build_transformer, dequantized_weights, quant_summary
from engine.quant.formats import e2m1
from engine.quant.linear import NVFP4Linear, QuantLinear
from harness import quantize as tool

WEIGHTS = "diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quantized(tiny_flux_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: tool.quantize_folder(tiny_flux_dir, fmt, root / fmt) for fmt in tool.FORMATS}


def _load(folder, spec, dtype=torch.float32):
    cfg = Flux1Config.from_diffusers(read_config(folder / "transformer"))
    return build_transformer(lambda: Flux1Transformer(cfg), diffusers_key_map(cfg), folder / "transformer", spec,
                             dtype, "cpu")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1], ids[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None, :]
    return (torch.randn(1, 64, 16, generator=g), torch.randn(1, 16, 64, generator=g) * 0.3, torch.tensor([1.0]),
            torch.randn(1, 32, generator=g) * 0.3, ids.reshape(-1, 3), torch.zeros(16, 3), torch.tensor([3.5]))


def _assert_same_weights(a, b):
    wa, wb = dequantized_weights(a), dequantized_weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _realigned(model):
    """Every tensor moved to a fresh allocation. CPU fp32 matmuls round differently depending on the weights'
    memory alignment (measured: same values, different outputs), and unquantized tensors loaded from safetensors
    are views at whatever offset the file put them."""
    for t in (*model.parameters(), *model.buffers()):
        t.data = t.data.clone()
    return model


def _copy_with(folder, tmp_path, edit):
    """A copy of `folder` whose transformer tensors (and quant config) `edit` rewrote in place."""
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    tensors = load_file(out / "transformer" / WEIGHTS)
    config_path = out / "transformer" / tool.CONFIG_NAME
    config = json.loads(config_path.read_text())
    edit(tensors, config)
    os.remove(out / "transformer" / WEIGHTS)  # a hard link to the original: never write through it
    save_file(tensors, str(out / "transformer" / WEIGHTS))
    config_path.unlink()
    if config:
        config_path.write_text(json.dumps(config))
    return out


# --- round trip -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,modes", [("nvfp4", ("nvfp4", "nvfp4-wo")), ("fp8-wo", ("fp8-wo", "fp8"))])
def test_checkpoint_loads_to_the_weights_of_online_quantization(tiny_flux_dir, quantized, fmt, modes):
    x = _inputs()
    for mode in modes:
        from_ckpt, online = _load(quantized[fmt], QuantSpec(mode)), _load(tiny_flux_dir, QuantSpec(mode))
        _assert_same_weights(from_ckpt, online)
        assert quant_summary(from_ckpt) == quant_summary(online)
        with torch.no_grad():
            assert torch.equal(_realigned(from_ckpt)(*x), _realigned(online)(*x))


def test_folder_layout(tiny_flux_dir, quantized):
    out = quantized["nvfp4"]
    for src in tiny_flux_dir.rglob("*"):
        rel = src.relative_to(tiny_flux_dir)
        if src.is_file() and rel.parts[0] != "transformer" or rel == rel.parent / "transformer" / "config.json":
            assert (out / rel).read_bytes() == src.read_bytes(), rel
    assert sorted(p.name for p in (out / "transformer").iterdir()) == sorted(["config.json", tool.CONFIG_NAME, WEIGHTS])
    quant = json.loads((out / "transformer" / tool.CONFIG_NAME).read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"} <= set(quant["exclude_modules"])
    tensors = read_checkpoint(out / "transformer")
    q = "single_transformer_blocks.0.attn.to_q"
    assert tensors[f"{q}.weight"].dtype == torch.uint8 and tensors[f"{q}.weight"].shape == (128, 64)
    assert tensors[f"{q}.weight_scale"].dtype == torch.float8_e4m3fn and tensors[f"{q}.weight_scale"].shape == (128, 8)
    assert tensors[f"{q}.weight_scale_2"].shape == () and f"{q}.input_scale" not in tensors
    assert tensors["proj_out.weight"].dtype == torch.float32  # the zoo's tiny storage dtype, untouched
    fp8 = read_checkpoint(quantized["fp8-wo"] / "transformer")
    assert fp8[f"{q}.weight"].dtype == torch.float8_e4m3fn and fp8[f"{q}.weight_scale"].shape == (128,)


def test_weight_bytes_per_mode(quantized, tiny_flux_dir):
    sizes = {fmt: quant_summary(_load(quantized[fmt], QuantSpec(fmt)))["weight_bytes"] for fmt in tool.FORMATS}
    plain = quant_summary(_load(tiny_flux_dir, QuantSpec()))["weight_bytes"]
    assert sizes["nvfp4"] < sizes["fp8-wo"] < plain


# --- keep_bf16, errors, atomicity -----------------------------------------------------------------------------------
def test_keep_bf16_keeps_whole_fused_modules(tiny_flux_dir, tmp_path):
    out = tool.quantize_folder(tiny_flux_dir, "nvfp4", tmp_path / "q",
                               keep_bf16=("transformer_blocks.0.attn.to_q", "single_blocks.1"))
    excluded = set(json.loads((out / "transformer" / tool.CONFIG_NAME).read_text())["quantization"]["exclude_modules"])
    assert {f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")} <= excluded
    assert {"single_transformer_blocks.1.proj_out", "single_transformer_blocks.1.proj_mlp"} <= excluded
    assert "transformer_blocks.1.attn.to_q" not in excluded
    model = _load(out, QuantSpec("nvfp4"))
    source = read_checkpoint(tiny_flux_dir / "transformer")
    assert type(model.double_blocks[0].img_qkv) is nn.Linear
    want = torch.cat([source[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"])
    assert torch.equal(model.double_blocks[0].img_qkv.weight, want)
    assert isinstance(model.double_blocks[1].img_qkv, NVFP4Linear)
    assert not any(isinstance(m, QuantLinear) for m in model.single_blocks[1].modules())


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_unmatched_keep_pattern_is_an_error_and_writes_nothing(tiny_flux_dir, tmp_path):
    with pytest.raises(ValueError, match="single_blocks.9"):
        tool.quantize_folder(tiny_flux_dir, "nvfp4", tmp_path / "q", keep_bf16=("single_blocks.9",))
    assert not (tmp_path / "q").exists() and not _leftovers(tmp_path)
    with pytest.raises(ValueError, match="int4"):
        tool.quantize_folder(tiny_flux_dir, "int4", tmp_path / "q")


def test_writing_is_atomic(tiny_flux_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tool, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        tool.quantize_folder(tiny_flux_dir, "fp8-wo", tmp_path / "q")
    assert not (tmp_path / "q").exists() and not _leftovers(tmp_path)
    monkeypatch.undo()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        tool.quantize_folder(tiny_flux_dir, "fp8-wo", tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"


def test_folder_format_and_mode_must_agree(quantized):
    with pytest.raises(CheckpointError, match=r"nvfp4 checkpoint.*'fp8'"):
        _load(quantized["nvfp4"], QuantSpec("fp8"))
    for mode in ("none", "mxfp4"):
        with pytest.raises(CheckpointError, match=f"nvfp4 checkpoint.*'{mode}'"):
            _load(quantized["nvfp4"], QuantSpec(mode))
    with pytest.raises(CheckpointError, match=r"fp8 checkpoint.*'nvfp4-wo'"):
        _load(quantized["fp8-wo"], QuantSpec("nvfp4-wo"))
    with pytest.raises(ValueError, match="already quantized"):
        tool.quantize_folder(quantized["nvfp4"], "nvfp4", quantized["nvfp4"].parent / "again")


# --- other producers' layouts ---------------------------------------------------------------------------------------
def test_fp8_per_row_layout_without_a_config_loads(quantized, tmp_path):
    """The public Ideogram 4 FP8 layout: e4m3 weight + fp32 weight_scale per row, no hf_quant_config.json."""
    def edit(tensors, config):
        for k in [k for k in tensors if k.endswith(".weight_scale")]:
            tensors[k] = tensors[k].reshape(-1, 1)
        config.clear()

    folder = _copy_with(quantized["fp8-wo"], tmp_path, edit)
    assert not (folder / "transformer" / tool.CONFIG_NAME).exists()
    _assert_same_weights(_load(folder, QuantSpec("fp8-wo")), _load(quantized["fp8-wo"], QuantSpec("fp8-wo")))
    with pytest.raises(CheckpointError, match="fp8 checkpoint"):
        _load(folder, QuantSpec("none"))


def test_modelopt_input_scales_and_high_nibble_first_exports(quantized, tmp_path):
    qkv = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]

    def edit(tensors, config):
        for k in [k for k in tensors if k.endswith(".weight_scale_2")]:
            tensors[k.replace("weight_scale_2", "input_scale")] = torch.tensor(0.01)
        for i, name in enumerate(qkv):
            tensors[f"{name}.input_scale"] = torch.tensor(0.01 * (i + 1))
        for k in [k for k in tensors if k.endswith(".weight") and tensors[k].dtype == torch.uint8]:
            tensors[k] = e2m1.swap_nibbles(tensors[k])

    folder = _copy_with(quantized["nvfp4"], tmp_path, edit)
    model = _load(folder, QuantSpec("nvfp4", swap_nibbles=True))
    _assert_same_weights(model, _load(quantized["nvfp4"], QuantSpec("nvfp4")))
    assert model.double_blocks[0].img_qkv.input_scale.item() == pytest.approx(0.03)  # the largest of q, k, v
    assert model.single_blocks[0].linear2.input_scale.item() == pytest.approx(0.01)
    unswapped = dequantized_weights(_load(folder, QuantSpec("nvfp4")))
    good = dequantized_weights(model)
    assert not torch.equal(unswapped["single_blocks.0.linear2"], good["single_blocks.0.linear2"])


def test_partly_quantized_fused_module_and_user_ignores_load_dequantized(tiny_flux_dir, quantized, tmp_path):
    source = read_checkpoint(tiny_flux_dir / "transformer")
    k = "transformer_blocks.0.attn.to_k"

    def edit(tensors, config):
        for leaf in ("weight_scale", "weight_scale_2"):
            del tensors[f"{k}.{leaf}"]
        tensors[f"{k}.weight"] = source[f"{k}.weight"]

    folder = _copy_with(quantized["nvfp4"], tmp_path, edit)
    model = _load(folder, QuantSpec("nvfp4", ignored=("single_blocks.0.linear2",)))
    reference = dequantized_weights(_load(quantized["nvfp4"], QuantSpec("nvfp4")))
    qkv = model.double_blocks[0].img_qkv
    assert type(qkv) is nn.Linear
    assert torch.equal(qkv.weight[128:256], source[f"{k}.weight"])  # the part stored unquantized is exact
    assert torch.equal(qkv.weight[:128], reference["double_blocks.0.img_qkv"][:128])  # to_q dequantized
    assert type(model.single_blocks[0].linear2) is nn.Linear
    assert torch.equal(model.single_blocks[0].linear2.weight, reference["single_blocks.0.linear2"])


def test_inconsistent_checkpoints_are_rejected(quantized, tmp_path):
    def contradict(tensors, config):
        config["quantization"]["exclude_modules"].append("transformer_blocks.1.attn.to_q")

    with pytest.raises(CheckpointError, match="transformer_blocks.1.attn.to_q is quantized but listed"):
        _load(_copy_with(quantized["nvfp4"], tmp_path, contradict), QuantSpec("nvfp4"))

    def stray(tensors, config):
        tensors["transformer_blocks.0.attn.to_q.k_scale"] = torch.tensor(1.0)

    shutil.rmtree(tmp_path / "edited")
    with pytest.raises(CheckpointError, match="unexpected keys.*k_scale"):
        _load(_copy_with(quantized["nvfp4"], tmp_path, stray), QuantSpec("nvfp4"))
