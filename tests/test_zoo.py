"""The synthetic model zoo: determinism, offline loading through diffusers, sane activations, outliers, atomicity."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from harness import zoo
from harness.zoo import flux1, synth, tokenizers

TINY_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return zoo.build("flux1", tmp_path_factory.mktemp("zoo") / "flux1-tiny", "tiny", seed=0)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_folder(tiny_dir, tmp_path):
    again = zoo.build("flux1", tmp_path / "again", "tiny", seed=0)
    first, second = _files(tiny_dir), _files(again)
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"rebuilt files differ: {differing}"


def test_in_memory_synthesis_matches_disk_and_seed_changes_every_tensor(tiny_dir):
    on_disk = load_file(str(tiny_dir / TINY_WEIGHTS))
    same = zoo.synthesize_transformer_state_dict("flux1", "tiny", seed=0)
    other = zoo.synthesize_transformer_state_dict("flux1", "tiny", seed=1)
    assert same.keys() == on_disk.keys() == other.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(same[name], tensor), name
        assert not torch.equal(other[name], tensor), name


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_components_load_without_missing_or_unexpected_keys(tiny_dir):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    for cls, sub in ((FluxTransformer2DModel, "transformer"), (AutoencoderKL, "vae"),
                     (CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")):
        _, info = cls.from_pretrained(tiny_dir / sub, output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        assert not bad, f"{sub}: {bad}"


def test_pipeline_loads_offline_and_generates_from_prompts(tiny_dir):
    from diffusers import FluxPipeline

    # diffusers and transformers loggers do not propagate to the root logger, so listen on them directly.
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        pipe = FluxPipeline.from_pretrained(tiny_dir)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    suspicious = [m for m in handler.messages if any(w in m.lower() for w in ("missing", "unexpected", "initialized"))]
    assert not suspicious, suspicious
    assert pipe.tokenizer_max_length == 77 and len(pipe.tokenizer) == tokenizers.CLIP_VOCAB_SIZE
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a photo of a cat", "The astronaut rides a horse on Mars."], height=64, width=64,
                  num_inference_steps=2, guidance_scale=3.5, max_sequence_length=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(images)).all()
    assert images.std() > 0.02, "image is (nearly) constant"
    assert abs(images[0] - images[1]).mean() > 1e-3, "different prompts gave the same image"


def test_activations_stay_sane_through_every_block(tiny_dir):
    """Hidden std within [0.05, 50] after every block (measured ~1.2-1.4: the bounds flag 20x drift, not noise), each
    block changes the stream (a near-identity block would hide block bugs), and modulation stays O(0.1..1)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_dir / "transformer").eval()
    stats, mods = [], []

    def after_block(name):
        def hook(module, args, kwargs, out):
            before = kwargs["hidden_states"]
            after = out[1] if isinstance(out, tuple) else out  # double blocks return (context, image)
            stats.append((name, after.std().item(), ((after - before).std() / before.std()).item()))
        return hook

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(after_block(f"double{i}"), with_kwargs=True)
        block.norm1.linear.register_forward_hook(lambda m, a, out: mods.append(out.std().item()))
    for i, block in enumerate(model.single_transformer_blocks):
        block.register_forward_hook(after_block(f"single{i}"), with_kwargs=True)

    cfg, g = model.config, torch.Generator().manual_seed(0)
    side, n_txt = 16, 64
    axis = torch.arange(side, dtype=torch.float32)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
    with torch.no_grad():
        out = model(hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                    img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3)).sample
    assert len(stats) == cfg.num_layers + cfg.num_single_layers
    for name, std, update in stats:
        assert 0.05 < std < 50, f"{name}: hidden std {std:.3g}"
        assert update > 0.02, f"{name}: block changes the stream by only {update:.3g} of its std"
    assert all(0.1 < m < 1.0 for m in mods), mods
    assert 0.1 < out.std().item() < 10


def test_clip_and_t5_tokenizers(tiny_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip) == 49408 and clip.model_max_length == 77
    t5 = T5TokenizerFast.from_pretrained(tiny_dir / "tokenizer_2")
    ids = t5("A cat, 42 dogs & {weird} ~chars~!").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids  # every ASCII character has a piece
    assert 1000 <= len(t5) <= 4000


def test_unknown_family_or_size_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'nope'.*flux1"):
        zoo.build("nope", tmp_path / "x")
    for call in (lambda: zoo.build("flux1", tmp_path / "x", "huge"), lambda: zoo.transformer_config("flux1", "huge"),
                 lambda: zoo.synthesize_transformer_state_dict("flux1", "huge"),
                 lambda: zoo.cached_build("flux1", "huge", root=tmp_path)):
        with pytest.raises(ValueError, match=r"'huge'.*tiny, full"):
            call()
    assert not any(tmp_path.iterdir())


def test_failed_build_leaves_nothing_and_existing_folder_needs_overwrite(tmp_path, monkeypatch):
    calls = []

    def fail_on_second(*args, **kwargs):  # the first component is already on disk when this fails
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = synth.write_safetensors
    monkeypatch.setattr(synth, "write_safetensors", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        zoo.build("flux1", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        zoo.build("flux1", tmp_path / "out")
    zoo.build("flux1", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / zoo.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or trash dirs left


def test_cached_build_builds_once(tmp_path, monkeypatch):
    path = zoo.cached_build("flux1", "tiny", 0, root=tmp_path)
    assert path.name == zoo.cache_key("flux1", "tiny", 0) and path.name.startswith("flux1-tiny-seed0-")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached_build rebuilt an existing folder")

    monkeypatch.setattr(zoo, "build", no_rebuild)
    assert zoo.cached_build("flux1", "tiny", 0, root=tmp_path) == path


def _column_ratio(w: torch.Tensor) -> float:
    norms = w.float().norm(dim=0)
    return (norms.max() / norms.median()).item()


def test_linear_weights_have_outlier_columns_and_rows(tiny_dir):
    weights = load_file(str(tiny_dir / TINY_WEIGHTS))
    assert _column_ratio(weights["single_transformer_blocks.0.proj_mlp.weight"]) > 4
    # A full-width linear: ~1% heavy columns (8-16x) and a few heavy rows, RMS still 1/sqrt(fan_in).
    w = synth.synth_tensor(synth.ParamSpec("probe", (1024, 3072), synth.LINEAR), seed=0, namespace="test")
    norms = w.norm(dim=0)
    heavy = (norms > 4 * norms.median()).sum().item()
    assert 0.005 * 3072 <= heavy <= 0.02 * 3072
    rows = w.norm(dim=1)
    assert (rows.max() / rows.median()).item() > 1.5
    assert w.pow(2).mean().sqrt().item() == pytest.approx(1 / math.sqrt(3072), rel=0.05)
    # Modulation linears carry no outliers: one dominant temb channel would drive every gate.
    mod = weights["transformer_blocks.0.norm1.linear.weight"]
    assert _column_ratio(mod) < 2


def test_full_size_tensor_kinds():
    kinds = {s.name: s.kind for s in flux1.transformer_specs("full")}
    assert kinds["transformer_blocks.0.attn.to_q.weight"] == synth.LINEAR
    assert kinds["single_transformer_blocks.0.norm.linear.weight"] == synth.LINEAR_PLAIN
    assert kinds["transformer_blocks.0.attn.norm_q.weight"] == synth.NORM
    assert zoo.transformer_config("flux1", "full")["num_single_layers"] == 38


def test_sharded_weights_load_like_one_file(tiny_dir, tmp_path):
    """Full-size models are written in shards (never whole in memory); diffusers must read the index."""
    from diffusers import FluxTransformer2DModel

    (tmp_path / "config.json").write_bytes((tiny_dir / "transformer" / "config.json").read_bytes())
    specs = flux1.transformer_specs("tiny")
    synth.write_safetensors(specs, 0, "transformer", tmp_path, "diffusion_pytorch_model", torch.float32,
                            shard_bytes=2 * 2**20)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    model = FluxTransformer2DModel.from_pretrained(tmp_path)
    want = load_file(str(tiny_dir / TINY_WEIGHTS))
    assert all(torch.equal(t, want[name]) for name, t in model.state_dict().items())


def test_full_size_folder_has_flux1_dev_components(tmp_path, monkeypatch):
    """Every full-size component builds and serializes its config; the 17B of weights are not synthesized here."""
    counts = {}

    def count_only(specs, seed, namespace, folder, stem, dtype, shard_bytes=0):
        counts[namespace] = sum(math.prod(s.shape) for s in specs)

    monkeypatch.setattr(synth, "write_safetensors", count_only)
    flux1.write(tmp_path, "full", seed=0)
    # Parameter counts of the released FLUX.1-dev components (T5: the XXL encoder only).
    assert counts["transformer"] == pytest.approx(11.90e9, rel=1e-3)
    assert counts["text_encoder_2"] == pytest.approx(4.762e9, rel=1e-3)
    assert counts["text_encoder"] == pytest.approx(123.1e6, rel=1e-3)
    assert counts["vae"] == pytest.approx(83.8e6, rel=1e-3)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert (tmp_path / sub / "config.json").is_file()


def test_drawing_on_the_cpu_is_the_default_and_changes_nothing(tiny_dir, tmp_path):
    """`draw_device` (a GPU draws a full-size model in seconds) must leave every CPU build as it was: same bytes,
    same cache name, so the goldens' model hashes still hold."""
    again = zoo.build("flux1", tmp_path / "cpu", "tiny", seed=0, draw_device="cpu")
    assert _files(again) == _files(tiny_dir)
    assert zoo.cache_key("flux1", "tiny", 0, draw_device="cpu") == zoo.cache_key("flux1", "tiny", 0)


def test_drawing_on_routes_the_writers_draws_and_hands_tensors_back_on_the_cpu(monkeypatch):
    seen = []

    def fake(spec, seed, namespace, device="cpu", dtype=torch.float32):
        seen.append(str(device))
        return torch.zeros(spec.shape, dtype=dtype)

    monkeypatch.setattr(synth, "synth_tensor", fake)
    specs = [synth.ParamSpec("a.weight", (2, 3), synth.LINEAR)]
    with synth.drawing_on("cuda:1"):
        out = synth.synthesize(specs, 0, "t")
        kept = synth.synthesize(specs, 0, "t", device="cpu")  # an explicit device wins
    synth.synthesize(specs, 0, "t")
    assert seen == ["cuda:1", "cpu", "cpu"] and out["a.weight"].device.type == "cpu"


@pytest.mark.parametrize("device", ["mps", "cuda"])
def test_drawing_on_a_device_that_cannot_draw_is_refused(device, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="cannot draw zoo weights") as e:
        zoo.build("flux1", tmp_path / "x", "tiny", draw_device=device)
    assert ("valid: cpu, cuda, cuda:N" if device == "mps" else "no CUDA device") in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing half-written
