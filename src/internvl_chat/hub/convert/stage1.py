"""Stage-1 artifact (LLaVA's `mm_projector.bin`, saved by pretraining with `tune_mm_mlp_adapter`) over a base LLM
and a CLIP tower folder: a model ready for stage 2 (pad mode, as the stage-2 recipe)."""

from __future__ import annotations

from pathlib import Path

from ...keymaps import llava_llm_key
from ..checkpoint_io import weight_files
from .common import (
    ConvertOptions,
    Plan,
    base_llm,
    config_of,
    num_linear,
    original_fields,
    original_mapper,
    tokenizer_dir,
)
from .towers import clip_folder_key, clip_tower


def detect(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    return (src / "mm_projector.bin").is_file() and not weight_files(src, required=False), "no mm_projector.bin"


def plan(src: Path, options: ConvertOptions) -> Plan:
    base, base_config = base_llm(options, "stage-1 artifact (mm_projector.bin)")
    config = config_of(src)
    tower = clip_tower(config, options, src, [], allow_embedded=False)
    fields = original_fields(src, config, options, "stage1", base_config, base / "config.json")
    fields["image_aspect_ratio"] = "pad"  # the stage-2 recipe (the stage-1 run itself used square crops)
    if not config:
        fields["projector_type"] = options.projector_type or "mlp2x_gelu"
    projector = original_mapper(num_linear(fields["projector_type"]))
    streams = [(base, llava_llm_key), (src / "mm_projector.bin", projector), (tower.folder, clip_folder_key)]
    plan = Plan(tower=tower, tokenizer_dir=tokenizer_dir(options, base), streams=streams, **fields)
    plan.notes["model_base"] = str(base)
    return plan
