"""Original LLaVA-1.5 (`LlavaLlamaForCausalLM`, model_type "llava") and ShareGPT4V (model_type "share4v", tower in
`vision_tower/`): CLIP tower embedded in the checkpoint or read from a folder."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint_io import weight_files
from .common import (
    LLM_TYPES,
    ConvertOptions,
    Plan,
    config_of,
    is_original,
    names_of,
    num_linear,
    original_fields,
    original_mapper,
    read_json,
    tokenizer_dir,
)
from .towers import clip_folder_key, clip_tower, tower_folder, tower_kind


def is_intern_vit(config: dict, names: list[str], folder: Path | None = None) -> bool:
    """An InternViT tower: the tower folder's config decides when there is one; else the tower's name or weights."""
    kind = tower_kind(folder)
    if kind is not None:
        return kind == "intern_vit"
    tower = str(config.get("mm_vision_tower", "")).lower().replace("-", "_")
    by_name = any(tag in tower for tag in ("intern_vit_6b", "internvit_6b", "internvit6b"))
    return by_name or any(n.endswith(".attn.qkv.weight") and "vision_tower.vision_tower." in n for n in names)


def detect(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    config = config_of(src)
    ok = (
        is_original(config)
        and config.get("model_type") in LLM_TYPES
        and not config.get("is_multipath_encoder")
        and not is_intern_vit(config, names_of(src), tower_folder(options, config))
        and bool(weight_files(src, required=False))
    )
    return ok, "config.json is not an original LLaVA config (mm_vision_tower, model_type 'llava') with weights"


def detect_sharegpt4v(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    return config_of(src).get("model_type") == "share4v", "config.json model_type is not 'share4v'"


def plan(src: Path, options: ConvertOptions, fmt: str = "llava") -> Plan:
    config = read_json(src / "config.json")
    tower = clip_tower(config, options, src, names_of(src))
    fields = original_fields(src, config, options, fmt, config, src / "config.json")
    streams = [(src, original_mapper(num_linear(fields["projector_type"])))]
    if tower.folder is not None:
        weight_files(tower.folder)  # fail early, naming the folder
        streams.append((tower.folder, clip_folder_key))
    return Plan(tower=tower, tokenizer_dir=tokenizer_dir(options, src), streams=streams, **fields)


def plan_sharegpt4v(src: Path, options: ConvertOptions) -> Plan:
    return plan(src, options, fmt="sharegpt4v")
