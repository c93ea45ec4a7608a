"""LLaVA-HR and LLaVAR-2 (`is_multipath_encoder`): a fast CLIP tower, a slow ConvNeXt tower, per-stage adapters and
the fusion; the slow tower's shape is read off the weights, the fast tower's config from a folder when there is
one (its heads cannot be read off the weights)."""

from __future__ import annotations

from pathlib import Path

from ...modeling.image_processing_internvl_chat import OPENAI_CLIP_MEAN as CLIP_MEAN
from ...modeling.image_processing_internvl_chat import OPENAI_CLIP_STD as CLIP_STD
from .common import (
    ConvertOptions,
    Plan,
    Tower,
    config_of,
    num_linear,
    original_fields,
    original_mapper,
    read_json,
    tokenizer_dir,
)
from .towers import clip_config_from_folder, clip_config_from_shapes, shapes_of, tower_folder

FAST = "model.vision_tower.fast_vision_tower.vision_tower.vision_model."
SLOW = "model.vision_tower.slow_vision_tower.vision_tower."


def detect(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    return bool(config_of(src).get("is_multipath_encoder")), "config.json has no is_multipath_encoder: true"


def plan(src: Path, options: ConvertOptions) -> Plan:
    from ...modeling.configuration_multipath import MultiPathVisionConfig

    config = read_json(src / "config.json")
    shapes = shapes_of(src)
    folder = tower_folder(options, config)
    fast = clip_config_from_folder(folder) if folder else clip_config_from_shapes(shapes, FAST)
    depths = [len({k.split(".")[7] for k in shapes if k.startswith(f"{SLOW}stages.{i}.blocks.")}) for i in range(4)]
    dims = [shapes[f"{SLOW}stages.{i}.blocks.0.conv_dw.weight"][0] for i in range(4)]
    adapters = any(k.startswith("model.vision_tower.align_stages_latent.") for k in shapes)
    vision = MultiPathVisionConfig(
        fast_config=fast.to_dict(),
        slow_model_name=str(config.get("vision_tower_slow", "convnext_large_mlp")).split(".")[0],
        slow_depths=depths,
        slow_dims=dims,
        input_image_size=int(config.get("input_image_size", 768)),
        freeze_vision=not adapters,
    )
    tower = Tower(vision, vision.input_image_size, CLIP_MEAN, CLIP_STD)
    fields = original_fields(src, config, options, "llava-hr", config, src / "config.json")
    streams = [(src, original_mapper(num_linear(fields["projector_type"])))]
    return Plan(tower=tower, tokenizer_dir=tokenizer_dir(options, src), streams=streams, **fields)
