"""InternVL-Chat-ViT-6B (LLaVA layout with an InternViT-6B tower, fused qkv): the tower inside the checkpoint or in
a tower folder. With `--from internvl --vision-tower DIR` the folder's config decides what the tower is."""

from __future__ import annotations

from pathlib import Path

from ...modeling.image_processing_internvl_chat import IMAGENET_MEAN, IMAGENET_STD
from ..checkpoint_io import weight_files
from .common import (
    ConvertOptions,
    Plan,
    Tower,
    config_of,
    is_original,
    names_of,
    num_linear,
    original_fields,
    original_mapper,
    read_json,
    tokenizer_dir,
)
from .llava import is_intern_vit
from .towers import intern_vit_config, intern_vit_folder_key, shapes_of, tower_folder, tower_kind

PREFIX = "model.vision_tower.vision_tower."


def detect(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    config = config_of(src)
    folder = tower_folder(options, config)
    if not is_original(config):
        return False, "config.json is not an original LLaVA-family config (no mm_vision_tower / mm_hidden_size)"
    if is_intern_vit(config, names_of(src), folder):
        return True, ""
    if tower_kind(folder) is not None:
        return False, f"the tower folder {folder} holds a {tower_kind(folder)} tower (its config.json), not InternViT"
    return False, "no InternViT tower in config.json / weights (pass --vision-tower DIR with the InternViT folder)"


def plan(src: Path, options: ConvertOptions) -> Plan:
    config = read_json(src / "config.json")
    names = names_of(src)
    folder = tower_folder(options, config)
    vision = intern_vit_config(folder, {} if folder else shapes_of(src), PREFIX)
    # The InternVL recipe runs the 224px tower at 336 (position embeddings interpolated), the 448px one at 448.
    size = options.image_size or (vision.image_size if vision.image_size >= 448 else 336)
    tower = Tower(vision, size, IMAGENET_MEAN, IMAGENET_STD)
    fields = original_fields(src, config, options, "internvl", config, src / "config.json")
    fields["feature_layer"] = int(config.get("mm_vision_select_layer", -4))
    streams = [(src, original_mapper(num_linear(fields["projector_type"])))]
    if not any(n.startswith(PREFIX) for n in names) and folder is not None and weight_files(folder, required=False):
        streams.append((folder, intern_vit_folder_key))
    return Plan(tower=tower, tokenizer_dir=tokenizer_dir(options, src), streams=streams, **fields)
