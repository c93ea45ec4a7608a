"""Configuration of the InternVL-Chat / LLaVA family (`model_type = "internvl_chat_llava"`).

One config covers LLaVA-1.5, InternVL-Chat-ViT-6B, LLaVAR-2 (LLaVA-HR multi-path encoder) and ShareGPT4V:

    from internvl_chat.modeling.configuration_internvl_chat import InternVLChatConfig
    config = InternVLChatConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, ...},
        text_config={"model_type": "llama", "hidden_size": 4096, ...},
        projector_type="mlp2x_gelu", vision_feature_layer=-2, vision_feature_select_strategy="patch",
    )

`vision_config` is a transformers `CLIPVisionConfig`, an `InternViTConfig` (`model_type "intern_vit_6b"`) or a
`MultiPathVisionConfig` (`model_type "internvl_chat_multipath"`); `text_config` is any causal LM config that
transformers knows (llama, phi3, mistral, qwen2, ...).
"""

import re

from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig

from .configuration_intern_vit import InternViTConfig
from .configuration_multipath import MultiPathVisionConfig

# Vision configs by `model_type`: a plain dict so adding a tower is one row (plus its modeling file and a test row).
VISION_CONFIGS = {
    "clip_vision_model": CLIPVisionConfig,
    "intern_vit_6b": InternViTConfig,
    "internvl_chat_multipath": MultiPathVisionConfig,
}

# "patch" drops the CLS token (LLaVA's default), "cls_patch" keeps it; llava-hf's names are accepted as aliases.
SELECT_STRATEGIES = {"patch": "patch", "cls_patch": "cls_patch", "default": "patch", "full": "cls_patch"}

AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForImageTextToText": "modeling_internvl_chat.InternVLChatForConditionalGeneration",
}

PROJECTOR_PATTERN = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")


def check_projector_type(projector_type: str) -> int:
    """Returns the number of Linear layers of `projector_type`, or raises a ValueError naming the bad value."""
    match = PROJECTOR_PATTERN.match(str(projector_type))
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(
            f"Unknown projector_type {projector_type!r}: expected 'linear', 'identity' or 'mlp{{N}}x_gelu' "
            "(e.g. 'mlp2x_gelu')."
        )
    if match.group(1) == "linear":
        return 1
    if match.group(1) == "identity":
        return 0
    return int(match.group(2))


def _build_vision_config(vision_config):
    if isinstance(vision_config, PreTrainedConfig):
        return vision_config
    vision_config = dict(vision_config or {})
    model_type = vision_config.pop("model_type", "clip_vision_model")
    if model_type not in VISION_CONFIGS:
        raise ValueError(
            f"Unknown vision_config.model_type {model_type!r}: supported towers are {sorted(VISION_CONFIGS)}."
        )
    return VISION_CONFIGS[model_type](**vision_config)


def _build_text_config(text_config):
    if isinstance(text_config, PreTrainedConfig):
        return text_config
    text_config = dict(text_config or {})
    model_type = text_config.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **text_config)


class InternVLChatConfig(PreTrainedConfig):
    """Config of a LLaVA-architecture VLM: vision tower → projector → causal LM.

    Args:
        vision_config: CLIP / InternViT / multi-path config (object or dict with `model_type`).
        text_config: config of the causal LM (object or dict with `model_type`).
        projector_type: `linear`, `identity` or `mlp{N}x_gelu`.
        vision_feature_layer: index into the tower's hidden-states list (-2 for CLIP, -4 for InternViT-6B);
            ignored by the multi-path encoder, which returns its fused features.
        vision_feature_select_strategy: `patch` (drop CLS) or `cls_patch` (keep it).
        image_token_id: id of the `<image>` token; each image fills `image_seq_length` of them.
        image_seq_length: tokens per image (576 for 336px/14, 1024 for 448px/14).
        template: name of the conversation template the model was trained with (informational; the processor
            holds the Jinja text).
    """

    model_type = "internvl_chat_llava"
    # [IMPORTANT] a plain dict (not transformers 5.23's `sub_configs_defaults`): 5.17 only knows `sub_configs`,
    # and both versions use it to push `dtype` and `attn_implementation` down to the towers and the LLM.
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}
    attribute_map = {"image_token_index": "image_token_id"}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projector_type: str = "mlp2x_gelu",
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "patch",
        image_token_id: int = 32000,
        image_seq_length: int = 576,
        template: str = "vicuna_v1",
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        check_projector_type(projector_type)
        if vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"Unknown vision_feature_select_strategy {vision_feature_select_strategy!r}: "
                f"expected one of {sorted(SELECT_STRATEGIES)}."
            )
        self.vision_config = _build_vision_config(vision_config)
        self.text_config = _build_text_config(text_config)
        self.projector_type = projector_type
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = SELECT_STRATEGIES[vision_feature_select_strategy]
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.template = template
        # All three Auto entries, so a saved folder loads through AutoConfig, AutoModel and
        # AutoModelForImageTextToText with trust_remote_code (save_pretrained only adds the saved class's own).
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def is_multipath_encoder(self) -> bool:
        """LLaVA-HR's `is_multipath_encoder`: the vision side is the CLIP + ConvNeXt multi-path encoder."""
        return self.vision_config.model_type == MultiPathVisionConfig.model_type

    @property
    def input_image_size(self) -> int | None:
        """LLaVA-HR's `input_image_size` (768 for LLaVAR-2); None for single-path towers."""
        return getattr(self.vision_config, "input_image_size", None) if self.is_multipath_encoder else None

    @property
    def use_vision_adapters(self) -> bool:
        """The multi-path encoder's mixture-of-resolution adapters exist (LLaVA-HR's `freeze_vision` False)."""
        return bool(getattr(self.vision_config, "use_adapters", False))

    @property
    def mm_hidden_size(self) -> int:
        """Width of the vision features entering the projector (LLaVA's `mm_hidden_size`)."""
        return self.vision_config.hidden_size
