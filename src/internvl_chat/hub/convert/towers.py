"""Vision towers of the source checkpoints: their configs (from a tower folder or read off the weights), image
preprocessing, and the key mapper of a tower folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ...keymaps import SKIP
from ...modeling.image_processing_internvl_chat import OPENAI_CLIP_MEAN as CLIP_MEAN
from ...modeling.image_processing_internvl_chat import OPENAI_CLIP_STD as CLIP_STD
from ..checkpoint_io import tensor_specs, weight_files
from .common import CONFIG_DROP, ConversionError, ConvertOptions, Tower, local_folder, read_json

logger = logging.getLogger(__name__)


def shapes_of(folder: Path) -> dict[str, tuple]:
    """name → shape of every tensor of a folder, without reading data (headers / mmap)."""
    return {name: shape for path in weight_files(folder) for name, shape, _ in tensor_specs(path)}


def tower_kind(folder: Path | None) -> str | None:
    """'intern_vit' / 'clip' from a tower folder's config.json; None when there is no folder or it tells neither."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = read_json(folder / "config.json")
    architectures = " ".join(config.get("architectures") or [])
    if config.get("model_type") == "intern_vit_6b" or "InternVisionModel" in architectures:
        return "intern_vit"
    if config.get("model_type") in ("clip", "clip_vision_model"):
        return "clip"
    return None


def tower_folder(options: ConvertOptions, config: dict) -> Path | None:
    """--vision-tower, else `mm_vision_tower` when it is a local folder; only folders with a config.json count."""
    for candidate in (options.vision_tower, local_folder(config.get("mm_vision_tower"))):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


def clip_config_from_folder(folder: Path):
    from transformers import CLIPVisionConfig

    config = read_json(folder / "config.json")
    if config.get("model_type") == "clip":  # a full CLIPModel folder (openai/clip-vit-large-patch14-336)
        config = config.get("vision_config", {})
    elif config.get("model_type") not in (None, "clip_vision_model"):
        raise ConversionError(f"{folder / 'config.json'}: expected a CLIP tower, found {config.get('model_type')!r}.")
    return CLIPVisionConfig(**{k: v for k, v in config.items() if k not in CONFIG_DROP})


def _layer_count(shapes: dict[str, tuple], prefix: str) -> int:
    index = len(prefix.split(".")) + 1  # prefix ends with "." (one empty part): + encoder, layers → the number
    return len({k.split(".")[index] for k in shapes if k.startswith(prefix + "encoder.layers.")})


def clip_config_from_shapes(shapes: dict[str, tuple], prefix: str):
    """CLIP vision config from tensor shapes (heads assumed 64 wide, as every OpenAI / LAION CLIP)."""
    from transformers import CLIPVisionConfig

    hidden = shapes[prefix + "embeddings.class_embedding"][0]
    patch = shapes[prefix + "embeddings.patch_embedding.weight"][-1]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
    logger.warning("No CLIP tower config found: inferring it from the weights (heads of width 64, quick_gelu).")
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_layer_count(shapes, prefix),
        num_attention_heads=hidden // 64,
        patch_size=patch,
        image_size=math.isqrt(positions - 1) * patch,
        hidden_act="quick_gelu",
    )


def image_processor_dict(folder: Path | None) -> dict | None:
    """The saved image-processor settings: preprocessor_config.json, or inside processor_config.json (5.x)."""
    if folder is None:
        return None
    if (folder / "preprocessor_config.json").is_file():
        return read_json(folder / "preprocessor_config.json")
    if (folder / "processor_config.json").is_file():
        return read_json(folder / "processor_config.json").get("image_processor")
    return None


def clip_preprocessing(folder: Path | None, config) -> tuple[int, tuple, tuple]:
    size, mean, std = config.image_size, CLIP_MEAN, CLIP_STD
    pre = image_processor_dict(folder)
    if pre:
        crop = pre.get("crop_size", size)
        size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return size, mean, std


def clip_tower(config: dict, options: ConvertOptions, src: Path, names: list[str], allow_embedded=True) -> Tower:
    """CLIP tower: config from --vision-tower / SRC/vision_tower / local mm_vision_tower; weights embedded or there."""
    embedded = allow_embedded and any(n.startswith("model.vision_tower.vision_tower.vision_model.") for n in names)
    candidates = [options.vision_tower, src / "vision_tower", local_folder(config.get("mm_vision_tower"))]
    folder = next((Path(c) for c in candidates if c and (Path(c) / "config.json").is_file()), None)
    if folder is not None:
        vision = clip_config_from_folder(folder)
    elif embedded:
        vision = clip_config_from_shapes(shapes_of(src), "model.vision_tower.vision_tower.vision_model.")
    else:
        raise ConversionError(
            f"The checkpoint has no vision tower and mm_vision_tower {config.get('mm_vision_tower')!r} is not a local "
            "folder: pass --vision-tower DIR (a CLIP folder such as clip-vit-large-patch14-336)."
        )
    size, mean, std = clip_preprocessing(folder, vision)
    return Tower(vision, options.image_size or size, mean, std, folder=None if embedded else folder)


def intern_vit_config(folder: Path | None, shapes: dict[str, tuple], prefix: str):
    from ...modeling.configuration_intern_vit import InternViTConfig

    known = set(InternViTConfig().to_dict())
    if folder is not None:
        config = read_json(folder / "config.json")
        if config.get("norm_type", "rms_norm") != "rms_norm":
            raise ConversionError(
                f"{folder / 'config.json'}: norm_type {config['norm_type']!r}; only rms_norm towers."
            )
        return InternViTConfig(**{k: v for k, v in config.items() if k in known and k not in ("model_type",)})
    hidden = shapes[prefix + "embeddings.class_embedding"][-1]
    patch = shapes[prefix + "embeddings.patch_embedding.weight"][-1]
    positions = shapes[prefix + "embeddings.position_embedding"][1]
    logger.warning("No InternViT config folder: inferring the tower from the weights (heads of width 128).")
    return InternViTConfig(
        hidden_size=hidden,
        num_hidden_layers=_layer_count(shapes, prefix),
        num_attention_heads=hidden // 128,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        patch_size=patch,
        image_size=math.isqrt(positions - 1) * patch,
        qkv_bias=prefix + "encoder.layers.0.attn.qkv.bias" in shapes,
        qk_normalization=prefix + "encoder.layers.0.attn.q_norm.weight" in shapes,
    )


def clip_folder_key(name: str) -> str | None:
    """CLIP tower-folder keys (CLIPVisionModel / CLIPModel saved by transformers 4.x, or 5.x without the level)."""
    if name.startswith("vision_model."):
        return "model.vision_tower." + name[len("vision_model.") :]
    if name.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "position_ids")):
        return SKIP  # the text half of a CLIPModel folder; LLaVA loads only CLIPVisionModel out of it
    if name.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "model.vision_tower." + name
    return None


def intern_vit_folder_key(name: str) -> str | None:
    """InternViT tower-folder keys (InternVisionModel: `embeddings.*`, `encoder.*`) → ours."""
    return "model.vision_tower." + name if name.startswith(("embeddings.", "encoder.")) else None
