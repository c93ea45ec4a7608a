"""LLaVA-HR's multi-path (mixture-of-resolution) vision encoder, the vision side of LLaVAR-2.

Two paths look at one square image of side S (`config.input_image_size`, 768 in LLaVA-HR):

* slow path: a timm ConvNeXt (`convnext_large_mlp` by default) on the full-resolution image; the map after its four
  stages, (B, C_s, S/32, S/32), is the slow feature;
* fast path: a CLIP ViT (`CLIPVisionModel`, ViT-L/14-336 by default) on the image resized bilinearly to
  `config.fast_image_size` (336 for S = 768); its patch tokens run through all blocks.

When the vision side is trained (`config.freeze_vision` False) three mixture-of-resolution adapters inject the slow
map into the fast tokens after blocks n/4, n/2 and 3n/4. A final fusion always adds a projection of the slow map to a
projection of the fast tokens. The output, `last_hidden_state` of shape (B, N_fast, C_f) without CLS (576 x 1024 for
S = 768), goes straight to the multimodal projector (no select-layer, no post-norm):

    config = MultiPathVisionConfig(input_image_size=768, freeze_vision=False)
    encoder = MultiPathVisionModel(config)
    features = encoder(pixel_values).last_hidden_state  # (B, 576, 1024)

Submodules mirror the original LLaVA-HR checkpoint (`model.vision_tower.{fast_vision_tower, slow_vision_tower,
align_stages_latent, align_stages}`) minus the original wrappers' inner levels; `convert_llava_hr_vision_key` maps
original key names onto this module.

timm is needed only for the slow tower and is imported lazily when it is built. This file is copied flat into saved
checkpoints as remote code.
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging

from .configuration_multipath import MultiPathVisionConfig

logger = logging.get_logger(__name__)

# timm's default ConvNeXt layer-scale init (`ls_init_value`), used to re-create missing slow-tower weights.
_CONVNEXT_LS_INIT = 1e-6


def _build_slow_tower(config):
    """timm ConvNeXt from the config, without classifier head (only the stem and the four stages are used)."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "The multi-path (LLaVA-HR) vision encoder needs timm for its ConvNeXt slow tower: `pip install timm`."
        ) from err
    # `depths` / `dims` override the named variant's; `convnext_large_mlp` only differs from `convnext_large` by an
    # MLP in its classifier head (`head_hidden_size`), which is dropped here, so the head setting is irrelevant.
    tower = timm.create_model(
        config.slow_model_name,
        pretrained=False,
        num_classes=0,
        head_hidden_size=None,
        depths=tuple(config.slow_depths),
        dims=tuple(config.slow_dims),
    )
    # The head (global pool, norm, MLP) never runs: remove it so that a trained vision side has no parameters
    # without gradient (DDP would complain). Original checkpoints carry `head.*` keys: drop them on conversion.
    tower.head = nn.Identity()
    return tower


def _resize_grid(x, size):
    """Square feature map (B, C, h, h) to (B, C, size, size) the way LLaVA-HR aligns slow features to the fast grid.

    Upsampling is bilinear with align_corners=True (computed in float32), downsampling an average pool with kernel =
    stride = h // size; LLaVA-HR only pairs grids whose sizes divide one another.
    """
    src = x.shape[-1]
    if src < size:
        return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=True).to(x.dtype)
    if src > size:
        if src % size != 0:
            raise ValueError(f"Cannot average-pool a {src}x{src} slow map onto a {size}x{size} fast grid.")
        return F.avg_pool2d(x, src // size, src // size)
    return x


class MultiPathAdapter(nn.Module):
    """Mixture-of-resolution adapter (LLaVA-HR's `S2FStitchAlignModuleV2`): injects the slow map into fast tokens.

    s = slow_proj(GELU(slow_conv(x))) resized to the fast grid; f = f + fast_proj(GELU(fast_conv(f)));
    g = gate(mean over positions of [f ; s]) (one scalar per image); out = f + tanh(g) * s.
    slow_proj and fast_proj are zero-initialised, so a new adapter starts as the identity.
    """

    def __init__(self, fast_dim, slow_dim):
        super().__init__()
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)  # depthwise 7x7
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(nn.Linear(fast_dim * 2, fast_dim // 2), nn.GELU(), nn.Linear(fast_dim // 2, 1))
        # Init scheme read by MultiPathVisionModel._init_weights (see there why it is tagged on the leaf layers).
        for layer in (self.slow_conv, self.fast_conv):
            layer._multipath_init = "xavier"
        for layer in (self.slow_proj, self.fast_proj):
            layer._multipath_init = "zeros"

    def forward(self, fast, slow):
        # fast: (B, N, C_f) tokens of a g x g grid; slow: (B, C_s, h, h)
        batch, num_tokens, dim = fast.shape
        grid = math.isqrt(num_tokens)
        s = self.slow_proj(F.gelu(self.slow_conv(slow)))  # (B, C_f, h, h)
        s = _resize_grid(s, grid).flatten(2).transpose(1, 2)  # (B, N, C_f)
        f = fast.transpose(1, 2).reshape(batch, dim, grid, grid)  # (B, C_f, g, g)
        f = f + self.fast_proj(F.gelu(self.fast_conv(f)))
        f = f.flatten(2).transpose(1, 2)  # (B, N, C_f)
        gate = self.gate(torch.cat([f, s], dim=-1).mean(dim=1)).unsqueeze(1)  # (B, 1, 1)
        return f + s * gate.tanh()


class MultiPathFusion(nn.Module):
    """Final fusion (LLaVA-HR's `MultiPathAlignModule`): fast_proj(fast) + slow_proj(slow resized to the fast grid)."""

    def __init__(self, fast_dim, slow_dim):
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(self, fast, slow):
        # fast: (B, N, C_f); slow: (B, C_s, h, h). The resize happens on the C_s-wide map, before projecting
        # (the adapters resize after projecting).
        grid = math.isqrt(fast.shape[1])
        slow = _resize_grid(slow, grid).flatten(2).transpose(1, 2)  # (B, N, C_s)
        return self.fast_proj(fast) + self.slow_proj(slow)


class MultiPathVisionModel(PreTrainedModel):
    """LLaVA-HR multi-path vision encoder: pixel_values (B, 3, S, S) -> last_hidden_state (B, N_fast, C_f)."""

    config_class = MultiPathVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Attention only happens in the CLIP tower, which supports these through transformers' attention interface.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "MultiPathAdapter"]

    def __init__(self, config: MultiPathVisionConfig):
        super().__init__(config)
        fast_config = config.fast_config
        # The CLIP tower follows this model's attention implementation (the config setter also propagates it).
        fast_config._attn_implementation = config._attn_implementation
        fast_dim, slow_dim = config.hidden_size, config.slow_hidden_size

        self.fast_vision_tower = CLIPVisionModel(fast_config)
        self.slow_vision_tower = _build_slow_tower(config)
        if not config.freeze_vision:
            # As in LLaVA-HR, the adapters only exist when the vision side is trained.
            self.align_stages_latent = nn.ModuleList([MultiPathAdapter(fast_dim, slow_dim) for _ in range(3)])
        self.align_stages = nn.ModuleList([MultiPathFusion(fast_dim, slow_dim)])
        # Set by gradient_checkpointing_enable(); mirrored onto timm's ConvNeXt stages at each forward. The CLIP
        # blocks are GradientCheckpointingLayers and checkpoint themselves once their own flag is set.
        self.gradient_checkpointing = False
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # [IMPORTANT] act on leaf layers only: for custom code, transformers 5 marks a module without parameters of
        # its own (such as MultiPathAdapter) as initialised without calling this method, so an `isinstance(module,
        # MultiPathAdapter)` branch would never run. `init.*` helpers skip tensors already loaded from a checkpoint.
        # The CLIP tower is a PreTrainedModel and gets CLIP's own init.
        scheme = getattr(module, "_multipath_init", None)
        if scheme == "zeros":
            # Adapter projections start at zero (as in the original), so a new adapter is the identity.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif scheme == "xavier":
            # Adapter convs: xavier-uniform weights, zero biases, as in the original.
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif self._is_slow_module(module):
            # timm's ConvNeXt scheme (trunc-normal 0.02 weights, zero biases, unit norms, 1e-6 layer scale), so that
            # slow-tower weights missing from a checkpoint are re-created the way timm builds them.
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                init.constant_(gamma, _CONVNEXT_LS_INIT)
        elif isinstance(module, nn.Linear):
            # Adapter gates and the final fusion (not zero: stage 1 trains the fusion from a non-degenerate start).
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)

    def _is_slow_module(self, module):
        ids = self.__dict__.get("_slow_module_ids")
        if ids is None:
            ids = self._slow_module_ids = {id(m) for m in self.slow_vision_tower.modules()}
        return id(module) in ids

    def get_input_embeddings(self):
        return self.fast_vision_tower.embeddings.patch_embedding

    def _fast_embeddings(self, pixel_values):
        """CLIP patch embeddings + position embeddings, CLS dropped, then pre_layrnorm: (B, g*g, C_f)."""
        embeddings = self.fast_vision_tower.embeddings
        # [IMPORTANT] call the submodules (not `.weight`) so that ZeRO-3 gathers their parameters.
        patches = embeddings.patch_embedding(pixel_values)  # (B, C_f, g, g)
        grid = patches.shape[-1]
        patches = patches.flatten(2).transpose(1, 2)  # (B, g*g, C_f)
        pos = embeddings.position_embedding(embeddings.position_ids)[:, 1:]  # (1, g0*g0, C_f), CLS row dropped
        if pos.shape[1] != grid * grid:
            # LLaVA-HR's `resample_pos_embed`: bicubic with antialias, in float32. [IMPORTANT] not transformers'
            # `interpolate_pos_encoding` (no antialias; antialiased bicubic uses a different kernel even upsampling).
            old = math.isqrt(pos.shape[1])
            pos_grid = pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C_f, g0, g0)
            pos_grid = F.interpolate(pos_grid, size=(grid, grid), mode="bicubic", antialias=True)
            pos = pos_grid.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(patches.dtype)
        # The CLS token is dropped right after the embeddings in LLaVA-HR and pre_layrnorm is per token, so it is
        # never built here.
        return self.fast_vision_tower.pre_layrnorm(patches + pos)

    def forward(self, pixel_values, return_dict=None, **kwargs):
        """pixel_values (B, 3, S, S), normalised with the CLIP statistics at side S = config.input_image_size.

        Returns `BaseModelOutputWithPooling` whose `last_hidden_state` is (B, N_fast, C_f) (no CLS, no post-norm)
        and `pooler_output` None. Extra keyword arguments (e.g. `output_hidden_states`) are accepted and ignored.
        """
        config = self.config
        pixel_values = pixel_values.to(self.dtype)

        # Fast path input: bilinear (align_corners=True) resize to fast_image_size, computed in float32.
        size = config.fast_image_size
        fast_pixels = F.interpolate(pixel_values.float(), size=(size, size), mode="bilinear", align_corners=True)
        y = self._fast_embeddings(fast_pixels.to(pixel_values.dtype))  # (B, N_fast, C_f)

        # Slow path: stem + four stages on the full-resolution image (timm's norm_pre is an Identity for ConvNeXt).
        slow = self.slow_vision_tower
        checkpoint_slow = self.gradient_checkpointing and self.training
        for stage in slow.stages:
            stage.grad_checkpointing = checkpoint_slow
        x = slow.stages(slow.stem(pixel_values))  # (B, C_s, S/32, S/32)

        # Fast path blocks, with the adapters after blocks adapter_layers (n/4, n/2, 3n/4) when trained. The blocks
        # run without masks; transformers 5 encoder layers return a tensor (4.x returned a tuple).
        adapters = {}
        if not config.freeze_vision:
            adapters = dict(zip(config.adapter_layers, self.align_stages_latent))
        for index, layer in enumerate(self.fast_vision_tower.encoder.layers):
            y = layer(y, None)
            if (index + 1) in adapters:
                y = adapters[index + 1](y, x)

        y = self.align_stages[0](y, x)  # (B, N_fast, C_f)
        output = BaseModelOutputWithPooling(last_hidden_state=y)
        return output if return_dict is not False else output.to_tuple()


def convert_llava_hr_vision_key(key):
    """Map an original LLaVA-HR vision-tower key (after its `model.vision_tower.` prefix) onto this module.

    Returns None for keys with no counterpart (the ConvNeXt classifier head).
    """
    key = key.replace("fast_vision_tower.vision_tower.vision_model.", "fast_vision_tower.", 1)
    key = key.replace("slow_vision_tower.vision_tower.", "slow_vision_tower.", 1)
    if key.startswith("slow_vision_tower.head."):
        return None
    # LLaVA-HR's own ConvNeXt copy renamed timm's layer scale `gamma` to `weight` (a DeepSpeed ZeRO-3 workaround).
    return re.sub(r"^(slow_vision_tower\.stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", key)


__all__ = ["MultiPathVisionModel", "convert_llava_hr_vision_key"]
