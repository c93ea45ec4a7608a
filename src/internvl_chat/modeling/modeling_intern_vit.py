"""InternViT-6B vision tower (the `intern_vit_6b` encoder of InternVL-Chat / `internvl_chat_llava` checkpoints).

A plain pre-norm ViT with RMSNorm, QK-normalisation (RMSNorm over the full width of q and k before the heads are
split), layer scale and no final norm. Parameter names match the original checkpoints exactly
(`embeddings.{class_embedding,patch_embedding,position_embedding}`, `encoder.layers.{j}.{norm1,attn.qkv,
attn.q_norm,attn.k_norm,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`), so an original tower state dict loads as is.

Usage:

    config = InternViTConfig()  # InternViT-6B-224px; the LLaVA recipes run it at 336px
    tower = InternViTModel(config)
    out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    features = out.hidden_states[-4][:, 1:]  # layer -4, CLS dropped: (batch, (336/14)**2, 3200)

Inputs of any resolution that is a multiple of `patch_size` work: the patch-grid position embeddings are
resampled bicubically at every forward when the grid differs from the one of `config.image_size`.
Attention runs through transformers' attention interface and follows `config._attn_implementation`
("eager", "sdpa", "flash_attention_2", ...).

This file is copied flat into saved checkpoints as remote code: it imports only torch and transformers, and its
sibling configuration module relatively.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_intern_vit import InternViTConfig

logger = logging.get_logger(__name__)


class InternViTRMSNorm(nn.Module):
    """RMSNorm as in the original: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # [IMPORTANT] the original casts back BEFORE multiplying by the weight; keep that order for bf16 parity.
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class InternViTDropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample); identity at rate 0 or in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # one Bernoulli draw per sample, broadcast over tokens and channels
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class InternViTEmbeddings(nn.Module):
    """Patch embedding (biased Conv2d) + learned CLS token + learned, resolution-adaptive position embeddings."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size

        self.class_embedding = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.num_patches = self.grid_size**2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_positions, self.embed_dim))

    def interpolate_patch_position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Patch-grid position embeddings resampled to a (height, width) grid: (1, height * width, C)."""
        patch_pos = self.position_embedding[:, 1:, :]
        if height == self.grid_size and width == self.grid_size:
            return patch_pos
        target_dtype = patch_pos.dtype
        # (1, g*g, C) -> (1, C, g, g); interpolate in float32 as the original does (bicubic is not
        # implemented for bf16 on every backend, and the rounding would differ).
        patch_pos = patch_pos.float().reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        # [IMPORTANT] bicubic, align_corners=False, no antialias: exactly the original `_get_pos_embed`.
        patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
        # (1, C, h, w) -> (1, h*w, C), row-major over the grid like the flattened conv output
        return patch_pos.reshape(1, -1, height * width).permute(0, 2, 1).to(target_dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))  # (B, C, h, w)
        batch_size, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # (B, h*w, C)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)  # (B, 1 + h*w, C)
        position_embedding = torch.cat(
            [self.position_embedding[:, :1, :], self.interpolate_patch_position_embedding(height, width)], dim=1
        )
        return embeddings + position_embedding.to(target_dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q/k/v: (B, H, N, D); returns ((B, N, H, D), (B, H, N, N)) like the other backends."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # softmax in float32 for stability in half precision (SDPA / flash do the same internally)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class InternViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and full-width QK RMSNorm."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"hidden_size ({self.embed_dim}) must be divisible by num_attention_heads ({self.num_heads})"
            )
        self.scale = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # read by transformers' sdpa / flash backends: the tower attends bidirectionally
        self.is_causal = False

        # rows [0:C] are q, [C:2C] k, [2C:3C] v (checkpoint layout)
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternViTRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternViTRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        query, key, value = self.qkv(hidden_states).chunk(3, dim=-1)  # 3 x (B, N, C)
        if self.qk_normalization:
            # [IMPORTANT] QK-norm is over the full width C (all heads together), before splitting heads;
            # a per-head norm would be a different model.
            query = self.q_norm(query)
            key = self.k_norm(key)

        # (B, N, C) -> (B, H, N, D)
        query = query.reshape(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.reshape(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        value = value.reshape(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        # "eager" (and None, for a standalone module) falls back to the implementation above. Keep the literal
        # `ALL_ATTENTION_FUNCTIONS.get_interface(` call: transformers greps the module source for it to allow
        # `model.set_attn_implementation(...)`.
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scale,
            is_causal=False,
            **kwargs,
        )
        # every backend returns (B, N, H, D) -> (B, N, C)
        attn_output = attn_output.reshape(batch_size, seq_len, self.embed_dim)
        return self.proj(attn_output), attn_weights


class InternViTMLP(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternViTEncoderLayer(GradientCheckpointingLayer):
    """x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x)) (with drop-path on both branches)."""

    def __init__(self, config: InternViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = InternViTRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = InternViTAttention(config)
        self.ls1 = nn.Parameter(config.layerscale_init * torch.ones(config.hidden_size))
        self.norm2 = InternViTRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = InternViTMLP(config)
        self.ls2 = nn.Parameter(config.layerscale_init * torch.ones(config.hidden_size))
        self.drop_path1 = InternViTDropPath(drop_path_rate)
        self.drop_path2 = InternViTDropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden_states must stay positional: GradientCheckpointingLayer only re-feeds positional args
        attn_output, attn_weights = self.attn(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path1(attn_output * self.ls1)
        hidden_states = hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states)) * self.ls2)
        return hidden_states, attn_weights


class InternViTEncoder(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        # Stochastic depth grows linearly with depth, as in the original (torch.linspace). Plain Python so the
        # tower also builds under `torch.device("meta")`, where tensors hold no data.
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList([InternViTEncoderLayer(config, rate) for rate in rates])
        self.gradient_checkpointing = False


class InternViTPreTrainedModel(PreTrainedModel):
    config_class = InternViTConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["InternViTEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # `init.*` helpers skip tensors already loaded from a checkpoint (transformers 5 loading protocol)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, InternViTRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, InternViTEmbeddings):
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, InternViTEncoderLayer):
            init.constant_(module.ls1, self.config.layerscale_init)
            init.constant_(module.ls2, self.config.layerscale_init)


class InternViTModel(InternViTPreTrainedModel):
    """InternViT tower: returns all hidden states (embeddings + every block); no final norm, no head."""

    def __init__(self, config: InternViTConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = InternViTEmbeddings(config)
        self.encoder = InternViTEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """pixel_values: (B, 3, H, W) with H, W multiples of patch_size.

        Returns `BaseModelOutputWithPooling` with last_hidden_state (B, 1 + h*w, C), pooler_output = the CLS token
        of the last layer (B, C), hidden_states = num_hidden_layers + 1 tensors (embedding output, then each block)
        when requested, attentions (eager only; None entries for sdpa / flash) when requested.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None:
            raise ValueError("pixel_values must be given")

        hidden_states = self.embeddings(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.encoder.layers:
            hidden_states, attn_weights = layer(hidden_states, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)

        pooled_output = hidden_states[:, 0]
        if not return_dict:
            return tuple(v for v in (hidden_states, pooled_output, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


__all__ = ["InternViTModel", "InternViTPreTrainedModel"]
