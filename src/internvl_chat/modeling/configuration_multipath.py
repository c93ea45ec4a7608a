"""Configuration of the LLaVA-HR multi-path (mixture-of-resolution) vision encoder used by LLaVAR-2.

`MultiPathVisionConfig` describes the encoder implemented in `modeling_multipath.py`: a fast CLIP ViT path on a
low-resolution copy of the image, a slow ConvNeXt path on the full-resolution image, three mixture-of-resolution
adapters between the CLIP blocks (`use_adapters`; LLaVA-HR builds them when the vision side is trained) and a
final fusion of the two paths. The defaults are LLaVA-HR's: CLIP ViT-L/14-336 + ConvNeXt-L (`convnext_large_mlp`)
at input 768:

    config = MultiPathVisionConfig(input_image_size=1024, use_adapters=True)
    encoder = MultiPathVisionModel(config)  # from modeling_multipath.py

This file is copied flat into saved checkpoints as remote code: it imports only `transformers`.
"""

from transformers import CLIPVisionConfig, PreTrainedConfig

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), LLaVA-HR's fast tower.
_DEFAULT_FAST_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}


def _build_fast_config(fast_config):
    if isinstance(fast_config, CLIPVisionConfig):
        return fast_config
    # [IMPORTANT] a dict is completed from the ViT-L/14-336 defaults, not CLIPVisionConfig's own (ViT-B/32):
    # `to_diff_dict` may save only the keys of a sub-config that differ from *our* default, and reloading those
    # into a bare CLIPVisionConfig would silently build a ViT-B/32.
    values = dict(_DEFAULT_FAST_CONFIG)
    if fast_config is not None:
        values.update({k: v for k, v in dict(fast_config).items() if k not in ("model_type", "transformers_version")})
    return CLIPVisionConfig(**values)


class MultiPathVisionConfig(PreTrainedConfig):
    """Hyper-parameters of a LLaVA-HR multi-path vision encoder.

    Args:
        fast_config: `CLIPVisionConfig` (or its dict) of the fast ViT path; default CLIP ViT-L/14-336 (hidden 1024,
            24 layers, 16 heads, MLP 4096, image 336, patch 14, quick_gelu). Missing dict keys take those defaults.
        slow_model_name: timm model name of the slow ConvNeXt path (built with `pretrained=False`; its
            `depths` / `dims` are overridden by `slow_depths` / `slow_dims`).
        slow_depths: blocks per ConvNeXt stage.
        slow_dims: widths of the four ConvNeXt stages; the last one is the slow feature width C_s.
        input_image_size: side S of the (square) input image. The slow map is S/32 x S/32; the fast path sees the
            image resized to `fast_image_size`.
        use_adapters: whether the three mixture-of-resolution adapters exist and run (structural: the weights are
            in the checkpoint exactly when True). LLaVA-HR creates them when its training flag `freeze_vision` is
            False; configs saved with `freeze_vision` are read as `use_adapters = not freeze_vision`.
        adapter_layers: indices of the CLIP blocks after which the adapters run, counted as "after that many
            blocks"; default (n/4, n/2, 3n/4) for an n-block tower (6, 12, 18 for 24 blocks).
        initializer_range: std of the normal init of the adapter / fusion weights.
    """

    model_type = "internvl_chat_multipath"
    sub_configs = {"fast_config": CLIPVisionConfig}

    def __init__(
        self,
        fast_config=None,
        slow_model_name="convnext_large_mlp",
        slow_depths=(3, 3, 27, 3),
        slow_dims=(192, 384, 768, 1536),
        input_image_size=768,
        use_adapters=None,
        adapter_layers=None,
        initializer_range=0.02,
        freeze_vision=None,
        **kwargs,
    ):
        if use_adapters is None:
            # Older configs (and LLaVA-HR's) carry the training flag `freeze_vision` instead.
            use_adapters = freeze_vision is not None and not freeze_vision
        self.fast_config = _build_fast_config(fast_config)
        self.slow_model_name = slow_model_name
        # Lists (not tuples) so that the config equals its JSON round trip.
        self.slow_depths = list(slow_depths)
        self.slow_dims = list(slow_dims)
        self.input_image_size = int(input_image_size)
        self.use_adapters = bool(use_adapters)
        if adapter_layers is None:
            n = self.fast_config.num_hidden_layers
            adapter_layers = [n // 4, n // 2, 3 * n // 4]
        self.adapter_layers = [int(i) for i in adapter_layers]
        if len(self.adapter_layers) != 3:
            raise ValueError(f"adapter_layers must hold 3 block indices (one per adapter), got {adapter_layers}")
        if len(self.slow_depths) != 4 or len(self.slow_dims) != 4:
            raise ValueError("slow_depths and slow_dims must each hold 4 values (one per ConvNeXt stage)")
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def freeze_vision(self):
        """Old name, inverted: `not use_adapters` (read and written, for configs and code of earlier versions)."""
        return not self.use_adapters

    @freeze_vision.setter
    def freeze_vision(self, value):
        self.use_adapters = not value

    @property
    def hidden_size(self):
        """Output width: the fast (CLIP) hidden size; the fusion projects the slow features onto it."""
        return self.fast_config.hidden_size

    @property
    def slow_hidden_size(self):
        """Width C_s of the slow map after the four ConvNeXt stages."""
        return self.slow_dims[-1]

    @property
    def fast_image_size(self):
        """Side of the fast path's input: max(S*14/32, CLIP image size), 336 for S = 768, 448 for S = 1024."""
        # The original computes int(S / 32 * 14); S * 14 // 32 is the same floor of a rational, without floats.
        return max(self.input_image_size * 14 // 32, _side(self.fast_config.image_size))

    @property
    def num_patches(self):
        """Number of output tokens N_fast = (fast_image_size // patch)^2 (576 for S = 768)."""
        return (self.fast_image_size // _side(self.fast_config.patch_size)) ** 2

    def to_dict(self):
        output = super().to_dict()
        # Nested config as a plain dict (the base class does it on recent versions; keep it explicit for all).
        if not isinstance(output.get("fast_config"), dict):
            output["fast_config"] = self.fast_config.to_dict()
        output["fast_config"].pop("transformers_version", None)
        return output


def _side(size):
    # CLIPVisionConfig allows int or (h, w); LLaVA-HR only uses square inputs.
    return size if isinstance(size, int) else int(size[0])


__all__ = ["MultiPathVisionConfig"]
