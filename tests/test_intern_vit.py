"""InternViT tower: parity with transformers' InternVLVisionModel, attention backends, position-embedding
interpolation, gradient checkpointing and save/load. Tiny float32 configs on CPU."""

import math

import pytest
import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from internvl_chat.modeling.configuration_intern_vit import InternViTConfig
from internvl_chat.modeling.modeling_intern_vit import InternViTModel

HIDDEN, LAYERS, HEADS, INTERMEDIATE, IMAGE, PATCH = 64, 4, 4, 128, 28, 14
TOL = 1e-5


def tiny_config(**overrides) -> InternViTConfig:
    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    kwargs.update(overrides)
    return InternViTConfig(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter (layer scales, norm weights, position embeddings included) with random values."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def random_model(seed: int = 0, **overrides) -> InternViTModel:
    model = InternViTModel(tiny_config(**overrides)).eval()
    randomize_(model, seed)
    return model


def pixels(size: int = IMAGE, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# transformers InternVLVisionModel -> original InternViT names (per-layer suffixes; q/k/v are fused separately)
_EMBEDDING_KEYS = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.position_embeddings": "embeddings.position_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
}
_LAYER_KEYS = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_after.weight": "norm2.weight",
    "lambda_1": "ls1",
    "lambda_2": "ls2",
    "attention.q_norm.weight": "attn.q_norm.weight",
    "attention.k_norm.weight": "attn.k_norm.weight",
    "attention.projection_layer.weight": "attn.proj.weight",
    "attention.projection_layer.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def hf_internvl_vision_to_intern_vit(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename an `InternVLVisionModel` state dict to InternViT keys; q/k/v become rows [0:C], [C:2C], [2C:3C]
    of the fused `attn.qkv` (no bias: attention_bias=False)."""
    converted = {new: state_dict[old] for old, new in _EMBEDDING_KEYS.items()}
    for j in range(num_layers):
        src, dst = f"encoder.layer.{j}.", f"encoder.layers.{j}."
        for old, new in _LAYER_KEYS.items():
            converted[dst + new] = state_dict[src + old]
        converted[dst + "attn.qkv.weight"] = torch.cat(
            [state_dict[f"{src}attention.{name}_proj.weight"] for name in ("q", "k", "v")], dim=0
        )
    return converted


def reference_model(seed: int = 0) -> InternVLVisionModel:
    config = InternVLVisionConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        image_size=IMAGE,
        patch_size=PATCH,
        norm_type="rms_norm",
        use_qk_norm=True,
        attention_bias=False,
        layer_scale_init_value=0.1,
        # use_mean_pooling=True makes the final `layernorm` an Identity: InternViT has no final norm
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        projection_dropout=0.0,
    )
    config._attn_implementation = "eager"
    model = InternVLVisionModel(config).eval()
    randomize_(model, seed)
    return model


@pytest.mark.parametrize("size", [IMAGE, IMAGE + PATCH])
def test_parity_with_transformers_internvl_vision(size):
    reference = reference_model()
    model = InternViTModel(tiny_config())
    model.set_attn_implementation("eager")
    result = model.load_state_dict(hf_internvl_vision_to_intern_vit(reference.state_dict(), LAYERS), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()

    x = pixels(size)
    with torch.no_grad():
        expected = reference(x, output_hidden_states=True)
        actual = model(x, output_hidden_states=True, return_dict=True)

    assert len(actual.hidden_states) == LAYERS + 1 == len(expected.hidden_states)
    diffs = [max_diff(a, e) for a, e in zip(actual.hidden_states, expected.hidden_states)]
    print(f"parity @{size}px, max abs diff per hidden state: {diffs}")
    assert max(diffs) <= TOL
    assert max_diff(actual.last_hidden_state, expected.last_hidden_state) <= TOL
    assert torch.equal(actual.pooler_output, actual.last_hidden_state[:, 0])
    assert actual.hidden_states[-1].abs().mean() > 0.1  # not a degenerate comparison


def test_eager_matches_sdpa():
    eager = random_model()
    eager.set_attn_implementation("eager")
    sdpa = random_model()
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    x = pixels()
    with torch.no_grad():
        out_eager = eager(x, output_hidden_states=True, output_attentions=True)
        out_sdpa = sdpa(x, output_hidden_states=True)
    for a, b in zip(out_eager.hidden_states, out_sdpa.hidden_states):
        assert max_diff(a, b) <= TOL
    assert len(out_eager.attentions) == LAYERS
    assert out_eager.attentions[0].shape == (2, HEADS, 1 + (IMAGE // PATCH) ** 2, 1 + (IMAGE // PATCH) ** 2)


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic-convolution weights of the 4 taps around a sample at fractional offset t (PyTorch's a=-0.75)."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    return [kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)]


def _bicubic_resize(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Separable bicubic resize of (h, w, C), align_corners=False, border taps clamped."""

    def resize_axis(x: torch.Tensor, out_len: int) -> torch.Tensor:  # resizes dim 0
        in_len = x.shape[0]
        rows = []
        for i in range(out_len):
            src = (i + 0.5) * in_len / out_len - 0.5
            base = math.floor(src)
            taps = [min(max(base + k, 0), in_len - 1) for k in (-1, 0, 1, 2)]
            rows.append(sum(w * x[t] for w, t in zip(_cubic_weights(src - base), taps)))
        return torch.stack(rows)

    grid = resize_axis(grid, out_h)
    return resize_axis(grid.transpose(0, 1), out_w).transpose(0, 1)


def test_position_embedding_interpolation():
    model = random_model()
    size = IMAGE + PATCH  # 42px on a 28px tower: 3x3 grid from 2x2
    x = pixels(size)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        emb = model.embeddings
        grid = IMAGE // PATCH
        pos = emb.position_embedding[0]  # (1 + grid*grid, C)
        new = size // PATCH
        patch_pos = _bicubic_resize(pos[1:].reshape(grid, grid, HIDDEN), new, new).reshape(new * new, HIDDEN)
        patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, new*new, C)
        expected = torch.cat(
            [(emb.class_embedding[0] + pos[:1]).expand(x.shape[0], 1, HIDDEN), patches + patch_pos], dim=1
        )
    assert out.last_hidden_state.shape == (2, 1 + new * new, HIDDEN)
    assert max_diff(out.hidden_states[0], expected) <= TOL


def test_gradient_checkpointing_same_grads():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = random_model()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
        model.train()
        out = model(pixels(), output_hidden_states=True)
        (out.hidden_states[-2].square().mean() + out.last_hidden_state.mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_save_load_round_trip(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    loaded = InternViTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.model_type == "intern_vit_6b"
    assert loaded.config.num_hidden_layers == LAYERS
    x = pixels()
    with torch.no_grad():
        a = model(x, output_hidden_states=True)
        b = loaded(x, output_hidden_states=True)
    for h_a, h_b in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(h_a, h_b)


def test_config_round_trip(tmp_path):
    config = tiny_config(qkv_bias=True, layerscale_init=0.5)
    assert InternViTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = InternViTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert (loaded.qkv_bias, loaded.layerscale_init, loaded.hidden_size) == (True, 0.5, HIDDEN)


def test_dtype_and_tuple_output():
    model = random_model().to(torch.bfloat16)
    out = model(pixels(), return_dict=False)  # float32 pixels are cast to the weights' dtype
    assert out[0].dtype == torch.bfloat16
    assert out[1].shape == (2, HIDDEN)
    assert isinstance(model.get_input_embeddings(), torch.nn.Conv2d)
