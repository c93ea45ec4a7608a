"""Tests of the LLaVA-HR multi-path vision encoder (configuration_multipath.py / modeling_multipath.py).

Tiny float32 CPU configs: CLIP hidden 32, 4 blocks, 2 heads, patch 14; ConvNeXt depths (1, 1, 1, 1), dims
(8, 16, 24, 32). Three geometries:
* "same": S = 64, CLIP image 28 -> fast input 28, fast grid 2x2 = slow grid 2x2;
* "up": S = 64, CLIP image 56 -> fast input 56, fast grid 4x4 > slow grid 2x2 (bilinear upsampling of the slow map,
  the stage-1 situation of LLaVA-HR at S = 384);
* "resample": S = 128, CLIP image 28 -> fast input 56, fast grid 4x4 from 2x2 position embeddings (bicubic
  antialiased resampling, the S = 1024 situation), slow grid 4x4.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig

from internvl_chat.modeling import configuration_multipath, modeling_multipath
from internvl_chat.modeling.configuration_multipath import MultiPathVisionConfig
from internvl_chat.modeling.modeling_multipath import MultiPathVisionModel, convert_llava_hr_vision_key

GEOMETRIES = {"same": (64, 28), "up": (64, 56), "resample": (128, 28)}


def tiny_config(geometry="same", freeze_vision=False, **kwargs):
    input_size, clip_size = GEOMETRIES[geometry]
    fast = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=clip_size)
    return MultiPathVisionConfig(
        fast_config=fast,
        slow_depths=(1, 1, 1, 1),
        slow_dims=(8, 16, 24, 32),
        input_image_size=input_size,
        freeze_vision=freeze_vision,
        **kwargs,
    )


def fill_(model, seed=0, scale=0.2):
    """Deterministic non-zero weights, independent of the libraries' init (zero-init projections included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def pixels(config, batch=2, seed=1):
    size = config.input_image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(geometry="same", freeze_vision=False, seed=0, **kwargs):
    torch.manual_seed(0)
    return fill_(MultiPathVisionModel(tiny_config(geometry, freeze_vision, **kwargs)), seed).eval()


# --------------------------------------------------------------------------------------------------------------
# Independent reference: timm's ConvNeXt forward_features, transformers' CLIP modules, torch functional ops.
# --------------------------------------------------------------------------------------------------------------


def ref_align(x, size):
    src = x.shape[-1]
    if src < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    if src > size:
        return F.avg_pool2d(x, src // size)
    return x


def ref_adapter(adapter, fast, slow):
    p = dict(adapter.named_parameters())
    b, n, c = fast.shape
    g = math.isqrt(n)
    s = F.conv2d(F.gelu(F.conv2d(slow, p["slow_conv.weight"], p["slow_conv.bias"])), p["slow_proj.weight"])
    s = s + p["slow_proj.bias"].view(1, -1, 1, 1)
    s = ref_align(s, g).reshape(b, c, n).permute(0, 2, 1)
    f = fast.permute(0, 2, 1).reshape(b, c, g, g)
    h = F.conv2d(f, p["fast_conv.weight"], p["fast_conv.bias"], padding=3, groups=c)
    f = f + F.conv2d(F.gelu(h), p["fast_proj.weight"], p["fast_proj.bias"])
    f = f.reshape(b, c, n).permute(0, 2, 1)
    pooled = torch.cat([f, s], dim=-1).mean(1)
    gate = F.linear(
        F.gelu(F.linear(pooled, p["gate.0.weight"], p["gate.0.bias"])), p["gate.2.weight"], p["gate.2.bias"]
    )
    return f + torch.tanh(gate)[:, :, None] * s


def reference_forward(model, x):
    config = model.config
    clip = model.fast_vision_tower
    size = max(config.input_image_size * 14 // 32, config.fast_config.image_size)
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    emb = clip.embeddings
    if size == config.fast_config.image_size:
        tokens = emb(y)[:, 1:]  # transformers' own embeddings (CLS dropped afterwards)
    else:
        patches = F.conv2d(y, emb.patch_embedding.weight, stride=14).flatten(2).transpose(1, 2)
        old = math.isqrt(emb.position_embedding.weight.shape[0] - 1)
        pos = emb.position_embedding.weight[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = size // 14
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
        tokens = patches + pos.reshape(1, grid * grid, -1)
    h = clip.pre_layrnorm(tokens)
    slow = model.slow_vision_tower.forward_features(x)  # timm: stem, stages, norm_pre
    if config.freeze_vision:
        h = clip.encoder(inputs_embeds=h).last_hidden_state
    else:
        for i, layer in enumerate(clip.encoder.layers):
            h = layer(h, None)
            if i + 1 in (1, 2, 3):  # n/4, n/2, 3n/4 of 4 blocks
                h = ref_adapter(model.align_stages_latent[(1, 2, 3).index(i + 1)], h, slow)
    fusion = model.align_stages[0]
    s = ref_align(slow, math.isqrt(h.shape[1])).flatten(2).transpose(1, 2)
    return F.linear(h, fusion.fast_proj.weight, fusion.fast_proj.bias) + F.linear(
        s, fusion.slow_proj.weight, fusion.slow_proj.bias
    )


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("freeze_vision", [False, True])
def test_matches_reference(geometry, freeze_vision):
    model = build(geometry, freeze_vision)
    x = pixels(model.config)
    with torch.no_grad():
        out = model(x).last_hidden_state
        ref = reference_forward(model, x)
    grid = model.config.fast_image_size // 14
    assert out.shape == (2, grid * grid, 32)
    assert out.shape[1] == model.config.num_patches
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert hasattr(model, "align_stages_latent") != freeze_vision


def test_resize_grid():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(modeling_multipath._resize_grid(x, 2), F.avg_pool2d(x, 2))
    up = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(modeling_multipath._resize_grid(x, 8), up)
    assert modeling_multipath._resize_grid(x, 4) is x
    with pytest.raises(ValueError):
        modeling_multipath._resize_grid(x, 3)


def test_adapters_change_the_output():
    trained = build("up", freeze_vision=False)
    frozen = MultiPathVisionModel(tiny_config("up", freeze_vision=True)).eval()
    frozen.load_state_dict(trained.state_dict(), strict=False)
    x = pixels(trained.config)
    with torch.no_grad():
        assert not torch.allclose(trained(x).last_hidden_state, frozen(x).last_hidden_state, atol=1e-3)


def test_fresh_adapters_are_identity():
    # Zero-initialised slow_proj / fast_proj: a freshly built adapter leaves the tokens unchanged.
    torch.manual_seed(0)
    model = MultiPathVisionModel(tiny_config("up", freeze_vision=False)).eval()
    for adapter in model.align_stages_latent:
        for name in ("slow_proj", "fast_proj"):
            assert torch.count_nonzero(getattr(adapter, name).weight) == 0
            assert torch.count_nonzero(getattr(adapter, name).bias) == 0
        assert torch.count_nonzero(adapter.slow_conv.weight) > 0
        assert torch.count_nonzero(adapter.gate[0].weight) > 0
    # The final fusion is not zero-initialised, and timm's layer scale keeps its 1e-6 start.
    assert torch.count_nonzero(model.align_stages[0].fast_proj.weight) > 0
    gamma = model.slow_vision_tower.stages[0].blocks[0].gamma
    torch.testing.assert_close(gamma, torch.full_like(gamma, 1e-6))
    frozen = MultiPathVisionModel(tiny_config("up", freeze_vision=True)).eval()
    frozen.load_state_dict(model.state_dict(), strict=False)
    x = pixels(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, frozen(x).last_hidden_state, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Golden values (fixed weights from fill_, fixed input): refactors must not change them.
# --------------------------------------------------------------------------------------------------------------

GOLDEN = {
    # geometry, freeze_vision: (sum, first 4 values of out[0, 0])
    ("up", False): (-467.677002, [-3.296009, -2.014074, -1.462306, -2.493061]),
    ("resample", True): (-309.823853, [-2.043414, 0.286268, -2.222611, -0.223519]),
}


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_values(key):
    geometry, freeze_vision = key
    model = build(geometry, freeze_vision)
    with torch.no_grad():
        out = model(pixels(model.config)).last_hidden_state
    total, first = GOLDEN[key]
    # Sums of 1024 values of magnitude ~1: 1e-4 absolute plus float32 accumulation slack.
    assert out.sum().item() == pytest.approx(total, abs=1e-4, rel=1e-6)
    torch.testing.assert_close(out[0, 0, :4], torch.tensor(first), atol=1e-4, rtol=0)


@pytest.mark.parametrize("input_size, tokens", [(768, 576), (1024, 1024), (384, 576)])
def test_full_size_output_shape_on_meta(input_size, tokens):
    config = MultiPathVisionConfig(input_image_size=input_size, freeze_vision=False)
    assert config.hidden_size == 1024 and config.slow_hidden_size == 1536
    assert config.adapter_layers == [6, 12, 18]
    assert config.num_patches == tokens
    assert config.fast_image_size == {768: 336, 1024: 448, 384: 336}[input_size]
    with torch.device("meta"):
        model = MultiPathVisionModel(config)
        out = model(torch.empty(1, 3, input_size, input_size)).last_hidden_state
    assert out.shape == (1, tokens, 1024)
    assert len(model.fast_vision_tower.encoder.layers) == 24
    assert [len(stage.blocks) for stage in model.slow_vision_tower.stages] == [3, 3, 27, 3]


# --------------------------------------------------------------------------------------------------------------
# Configuration, save / load, attention implementation
# --------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_dict(tmp_path):
    config = MultiPathVisionConfig()
    assert isinstance(config.fast_config, CLIPVisionConfig)
    fast = config.fast_config
    assert (fast.hidden_size, fast.num_hidden_layers, fast.num_attention_heads, fast.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    assert (fast.image_size, fast.patch_size, fast.hidden_act) == (336, 14, "quick_gelu")
    assert config.model_type == "internvl_chat_multipath"
    assert isinstance(config.to_dict()["fast_config"], dict)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert isinstance(saved["fast_config"], dict) and saved["fast_config"]["hidden_size"] == 1024
    loaded = MultiPathVisionConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.fast_image_size == 336
    # A partial dict is completed with ViT-L/14-336 values, not CLIPVisionConfig's ViT-B/32 defaults.
    partial = MultiPathVisionConfig(fast_config={"num_hidden_layers": 8})
    assert partial.fast_config.hidden_size == 1024 and partial.adapter_layers == [2, 4, 6]


def comparable(config):
    """Config dict without the fields that loading legitimately fills in (source path, dtype)."""
    values = config.to_dict()
    for d in (values, values["fast_config"]):
        for key in ("_name_or_path", "dtype", "transformers_version"):
            d.pop(key, None)
    return values


def test_save_load_round_trip(tmp_path):
    model = build("resample", freeze_vision=False)
    model.save_pretrained(tmp_path)
    loaded = MultiPathVisionModel.from_pretrained(tmp_path).eval()
    assert comparable(loaded.config) == comparable(model.config)
    reference = model.state_dict()
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    # Non-persistent buffer re-created on load (it is not in the checkpoint).
    ids = loaded.fast_vision_tower.embeddings.position_ids
    assert torch.equal(ids, torch.arange(ids.shape[-1])[None])
    x = pixels(model.config)
    with torch.no_grad():
        # Same weights bit for bit; loaded (memory-mapped) tensors may take another CPU kernel path: ~1e-7 noise.
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_missing_adapters_get_zero_init_on_load(tmp_path):
    # A stage-1 checkpoint (frozen vision, no adapters) loaded for stage 2: the adapters are created and are the
    # identity, so the features do not change.
    frozen = build("up", freeze_vision=True)
    frozen.save_pretrained(tmp_path)
    trained = MultiPathVisionModel.from_pretrained(tmp_path, freeze_vision=False).eval()
    assert not trained.config.freeze_vision
    assert torch.count_nonzero(trained.align_stages_latent[0].slow_proj.weight) == 0
    assert torch.count_nonzero(trained.align_stages_latent[0].slow_conv.weight) > 0
    x = pixels(frozen.config)
    with torch.no_grad():
        torch.testing.assert_close(trained(x).last_hidden_state, frozen(x).last_hidden_state, atol=1e-6, rtol=1e-6)


def test_attn_implementation_propagates():
    config = tiny_config("up")
    eager = MultiPathVisionModel._from_config(config, attn_implementation="eager").eval()
    assert eager.fast_vision_tower.config._attn_implementation == "eager"
    sdpa = MultiPathVisionModel._from_config(tiny_config("up"), attn_implementation="sdpa").eval()
    assert sdpa.fast_vision_tower.config._attn_implementation == "sdpa"
    fill_(eager)
    fill_(sdpa)
    x = pixels(config)
    with torch.no_grad():
        torch.testing.assert_close(eager(x).last_hidden_state, sdpa(x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_return_dict_false():
    model = build("same")
    x = pixels(model.config)
    with torch.no_grad():
        out = model(x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], model(x).last_hidden_state)


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------------------------


def _grads(model, x):
    model.zero_grad()
    model(x).last_hidden_state.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing():
    model = build("up", freeze_vision=False).train()
    x = pixels(model.config)
    plain = _grads(model, x)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.fast_vision_tower.encoder.layers)
    checkpointed = _grads(model, x)
    assert all(stage.grad_checkpointing for stage in model.slow_vision_tower.stages)
    assert checkpointed.keys() == plain.keys()
    # Every adapter and the stages of both towers receive gradients.
    assert any(k.startswith("slow_vision_tower.stages.0.") for k in plain)
    assert any(k.startswith("align_stages_latent.0.gate") for k in plain)
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        model(x)
    assert not any(stage.grad_checkpointing for stage in model.slow_vision_tower.stages)


# --------------------------------------------------------------------------------------------------------------
# Remote-code rules: flat copy imports without timm; a clear error when timm is missing
# --------------------------------------------------------------------------------------------------------------


def _flat_copy(tmp_path):
    package = tmp_path / "flat_multipath"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module in (configuration_multipath, modeling_multipath):
        shutil.copy(module.__file__, package / os.path.basename(module.__file__))
    return tmp_path


def _run(code, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), *sys.path]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_import_does_not_import_timm(tmp_path):
    root = _flat_copy(tmp_path)
    result = _run(
        """
        import sys
        import flat_multipath.modeling_multipath as m
        assert "timm" not in sys.modules, "timm imported at module import"
        config = m.MultiPathVisionConfig(fast_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=64, image_size=28), slow_depths=(1, 1, 1, 1), slow_dims=(8, 16, 24, 32),
            input_image_size=64)
        assert "timm" not in sys.modules, "timm imported by the config"
        m.MultiPathVisionModel(config)
        assert "timm" in sys.modules
        print("ok")
        """,
        root,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_missing_timm_error(tmp_path):
    root = _flat_copy(tmp_path)
    result = _run(
        """
        import sys
        sys.modules["timm"] = None  # makes `import timm` raise ImportError
        import flat_multipath.modeling_multipath as m
        config = m.MultiPathVisionConfig(fast_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=64, image_size=28), slow_depths=(1, 1, 1, 1), slow_dims=(8, 16, 24, 32),
            input_image_size=64)
        try:
            m.MultiPathVisionModel(config)
        except ImportError as err:
            print("error:", err)
        """,
        root,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install timm" in result.stdout


# --------------------------------------------------------------------------------------------------------------
# Original checkpoint key names
# --------------------------------------------------------------------------------------------------------------


def test_convert_llava_hr_vision_key():
    model = build("same", freeze_vision=False)
    keys = set(model.state_dict())
    original = {
        "fast_vision_tower.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight": (
            "fast_vision_tower.encoder.layers.3.self_attn.q_proj.weight"
        ),
        "fast_vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": (
            "fast_vision_tower.embeddings.position_embedding.weight"
        ),
        "fast_vision_tower.vision_tower.vision_model.pre_layrnorm.bias": "fast_vision_tower.pre_layrnorm.bias",
        "slow_vision_tower.vision_tower.stem.0.weight": "slow_vision_tower.stem.0.weight",
        "slow_vision_tower.vision_tower.stages.2.blocks.0.weight": "slow_vision_tower.stages.2.blocks.0.gamma",
        "slow_vision_tower.vision_tower.stages.2.blocks.0.mlp.fc1.weight": (
            "slow_vision_tower.stages.2.blocks.0.mlp.fc1.weight"
        ),
        "slow_vision_tower.vision_tower.stages.1.downsample.1.weight": (
            "slow_vision_tower.stages.1.downsample.1.weight"
        ),
        "align_stages_latent.2.gate.2.weight": "align_stages_latent.2.gate.2.weight",
        "align_stages_latent.0.fast_conv.weight": "align_stages_latent.0.fast_conv.weight",
        "align_stages.0.slow_proj.bias": "align_stages.0.slow_proj.bias",
    }
    for old, new in original.items():
        assert convert_llava_hr_vision_key(old) == new
        assert new in keys, new
    assert convert_llava_hr_vision_key("slow_vision_tower.vision_tower.head.norm.weight") is None
