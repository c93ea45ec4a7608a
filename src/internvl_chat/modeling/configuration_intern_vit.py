"""Configuration of InternViT-6B, the vision tower of InternVL-Chat (LLaVA-architecture) checkpoints.

`InternViTConfig` describes the tower implemented in `modeling_intern_vit.py`; the defaults are the released
InternViT-6B-224px (width 3200, 48 layers, 25 heads of 128, MLP 12800, patch 14, RMSNorm, QK-normalisation,
layer scale 0.1). The later V1-2 / V1-5 towers use 45 layers and 448px images:

    config = InternViTConfig(num_hidden_layers=45, image_size=448)
    tower = InternViTModel(config)

This file is copied flat into saved checkpoints as remote code: it imports only `transformers`.
"""

from transformers import PreTrainedConfig


class InternViTConfig(PreTrainedConfig):
    """Hyper-parameters of an InternViT vision tower.

    Args:
        hidden_size: width C of the residual stream.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: heads per block (head dim = hidden_size / num_attention_heads).
        intermediate_size: hidden width of the MLP.
        image_size: resolution the position embeddings were trained at; other resolutions are served by bicubic
            interpolation of the patch-grid position embeddings at every forward.
        patch_size: side of the square patches (stride of the patch-embedding convolution).
        num_channels: input channels.
        layer_norm_eps: epsilon of every RMSNorm (block pre-norms and QK-norms).
        qk_normalization: apply RMSNorm over the full width of q and k before splitting heads.
        qkv_bias: bias of the fused qkv projection (False for InternViT-6B).
        layerscale_init: initial value of the layer-scale vectors `ls1` / `ls2`.
        hidden_act: MLP activation.
        drop_path_rate: stochastic-depth rate, linearly increasing over depth (0 in released configs).
        attention_dropout: dropout on attention probabilities during training.
        initializer_range: std of the normal init of linear / conv / embedding weights.
    """

    model_type = "intern_vit_6b"

    def __init__(
        self,
        hidden_size=3200,
        num_hidden_layers=48,
        num_attention_heads=25,
        intermediate_size=12800,
        image_size=224,
        patch_size=14,
        num_channels=3,
        layer_norm_eps=1e-6,
        qk_normalization=True,
        qkv_bias=False,
        layerscale_init=0.1,
        hidden_act="gelu",
        drop_path_rate=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.qk_normalization = qk_normalization
        self.qkv_bias = qkv_bias
        self.layerscale_init = layerscale_init
        self.hidden_act = hidden_act
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


__all__ = ["InternViTConfig"]
