"""transformers' Llava (`LlavaForConditionalGeneration`, the llava-hf checkpoints), the 4.x and the 5.x key
layouts: CLIP tower, biased GELU projector, one feature layer; the way back from `internvl-chat export`."""

from __future__ import annotations

from pathlib import Path

from ...keymaps import llava_hf_key
from .common import (
    CONFIG_DROP,
    ConversionError,
    ConvertOptions,
    Plan,
    Tower,
    config_of,
    is_original,
    read_json,
    text_config_from,
    tokenizer_dir,
)
from .towers import clip_preprocessing, image_processor_dict


def detect(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    config = config_of(src)
    ok = config.get("model_type") == "llava" and "text_config" in config and not is_original(config)
    return ok, "config.json is not a transformers LlavaConfig (model_type 'llava' with text_config)"


def plan(src: Path, options: ConvertOptions) -> Plan:
    from transformers import CLIPVisionConfig

    config = read_json(src / "config.json")
    vision = dict(config.get("vision_config") or {})
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{src / 'config.json'}: only CLIP towers convert, found {vision.get('model_type')!r}.")
    if config.get("projector_hidden_act", "gelu") != "gelu" or config.get("multimodal_projector_bias") is False:
        raise ConversionError(f"{src / 'config.json'}: only the biased GELU projector (mlp2x_gelu) converts.")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"{src / 'config.json'}: multi-layer vision_feature_layer {layer} is not supported.")
    vision = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in CONFIG_DROP})
    text = dict(config["text_config"])
    size, mean, std = clip_preprocessing(src, vision)
    # LlavaImageProcessor's do_pad is LLaVA's expand2square (pad mode); without it the plain CLIP crop.
    mode = "pad" if (image_processor_dict(src) or {}).get("do_pad") else "square"
    strategy = {"default": "patch", "full": "cls_patch"}.get(config.get("vision_feature_select_strategy", "default"))
    return Plan(
        format="llava-hf",
        text_config=text_config_from(text, text.get("model_type", "llama")),
        tower=Tower(vision, options.image_size or size, mean, std),
        tokenizer_dir=tokenizer_dir(options, src),
        streams=[(src, llava_hf_key)],
        projector_type="mlp2x_gelu",
        feature_layer=layer,
        select_strategy=strategy or "patch",
        image_aspect_ratio=mode,
        model_max_length=2048,
        template=options.template,
        source_dtype=text.get("dtype") or config.get("dtype") or config.get("torch_dtype"),
    )
