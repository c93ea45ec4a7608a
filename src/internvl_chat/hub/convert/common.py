"""What every source format shares: the typed options, the conversion plan, the error, config helpers.

A format module reads its source into a `Plan` (output config pieces + tensor streams with their key mappers);
`writer.write_model` turns any plan into our folder. Nothing here reads tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ...keymaps import SKIP, llava_llm_key, llava_projector_key
from ...loading import DTYPES
from ..checkpoint_io import CheckpointError, folder_tensor_names

# Original `model_type` → the text model's transformers `model_type` (LLaVA, LLaVA-pp / LLaVAR-2, ShareGPT4V).
LLM_TYPES = {
    "llava": "llama",
    "llava_llama": "llama",
    "share4v": "llama",
    "llava_phi": "phi3",
    "llava_phi3": "phi3",
    "llava_mistral": "mistral",
    "llama": "llama",
    "phi3": "phi3",
    "mistral": "mistral",
}
CONFIG_DROP = {"model_type", "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"}

Mapper = Callable[[str], "str | None"]  # source key → our key, SKIP (known, no counterpart) or None (unknown)


class ConversionError(CheckpointError):
    """The source does not fit the format or our model; the message names the file, the flag or the keys."""


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `convert` accepts besides the two folders (the command line's flags, one field each)."""

    fmt: str | None = None  # source format; None: detect
    vision_tower: Path | None = None  # local CLIP / InternViT tower folder
    model_base: Path | None = None  # base LLM of a stage-1 or LoRA artifact
    keep_adapter: bool = False  # LoRA: write DST/adapter over the unmerged base instead of merging
    dtype: str = "auto"  # output dtype; auto: as stored
    max_shard_size: int | str = "5GB"
    tokenizer: Path | None = None
    template: str | None = None
    image_size: int | None = None
    projector_type: str | None = None  # stage-1 artifact without config.json
    allow_unknown: bool = False  # convert without unknown keys (listed in conversion.json)

    def __post_init__(self):
        for name in ("vision_tower", "model_base", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(str(value)))
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConversionError(f"Unknown dtype {self.dtype!r}; use auto or one of {', '.join(DTYPES)}.")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class Tower:
    """Vision side of the output: config object, image preprocessing, and where its weights come from."""

    config: object
    input_size: int
    mean: tuple
    std: tuple
    folder: Path | None = None  # tower weights from a folder (`vision_model.*`), unless embedded in the checkpoint


@dataclass
class LoraAdapter:
    """A LoRA kept as a PEFT adapter next to the converted base (`--keep-adapter`)."""

    config: dict  # the source adapter_config.json
    pairs: dict[str, dict[str, torch.Tensor]]  # our weight name → {"A": lora_A, "B": lora_B}
    ranks: dict[str, int]  # our weight name → rank (rank_pattern resolved)
    alphas: dict[str, float]  # our weight name → alpha (alpha_pattern resolved)


@dataclass
class Plan:
    """Everything the writer needs: the output config pieces, the tensor streams and the tokenizer source."""

    format: str
    text_config: dict
    tower: Tower
    tokenizer_dir: Path
    streams: list[tuple[Path, Mapper]]  # (folder or file, key mapper), read in this order; first key wins
    projector_type: str = "mlp2x_gelu"
    feature_layer: int = -2
    select_strategy: str = "patch"
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    template: str | None = None
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # on our key names (LoRA merge)
    source_dtype: str | None = None
    adapter: LoraAdapter | None = None  # written as DST/adapter
    notes: dict = field(default_factory=dict)  # extra fields of conversion.json


# --------------------------------------------------------------------------------------------------------------
# Reading configs and folders
# --------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConversionError(f"Missing {path}.") from err
    except (ValueError, OSError) as err:
        raise ConversionError(f"Cannot parse {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"Cannot parse {path}: expected a JSON object, found {type(data).__name__}.")
    return data


def config_of(src: Path) -> dict:
    return read_json(src / "config.json") if (src / "config.json").is_file() else {}


def names_of(src: Path) -> list[str]:
    try:
        return folder_tensor_names(src) or []
    except CheckpointError:
        return []


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def local_folder(value) -> Path | None:
    if value and Path(str(value)).is_dir():
        return Path(str(value))
    return None


def is_original(config: dict) -> bool:
    return "mm_vision_tower" in config or "mm_hidden_size" in config or "mm_projector_type" in config


def text_config_from(source: dict, llm_type: str) -> dict:
    """The LLM's config fields out of an original config (LLM fields + `mm_*` fields in one flat dict)."""
    from transformers import AutoConfig

    known = set(AutoConfig.for_model(llm_type).to_dict())
    drop = CONFIG_DROP | {"auto_map"}
    return {"model_type": llm_type, **{k: v for k, v in source.items() if k in known and k not in drop}}


def llm_type(config: dict, where: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in LLM_TYPES:
        raise ConversionError(f"{where}: unknown model_type {model_type!r}; known: {sorted(LLM_TYPES)}.")
    return LLM_TYPES[model_type]


def image_mode(value: str | None) -> str:
    # LLaVA's `image_aspect_ratio`: "pad" for finetuned models; "square" (or unset) means the plain CLIP crop.
    if value in (None, "square", "crop"):
        return "square"
    if value in ("pad", "resize"):
        return value
    raise ConversionError(f"image_aspect_ratio {value!r} is not supported (pad, square and resize are).")


def num_linear(projector_type: str) -> int:
    from ...modeling.configuration_internvl_chat import check_projector_type

    try:
        return check_projector_type(projector_type)
    except ValueError as err:
        raise ConversionError(str(err)) from err


def original_fields(src: Path, config: dict, options: ConvertOptions, fmt: str, text_source: dict, text_where: Path):
    """The Plan fields every original-LLaVA-family format reads the same way (LLaVA's builder defaults)."""
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConversionError(
            f"{src / 'config.json'}: mm_use_im_start_end / mm_use_im_patch_token models (LLaVA v0) are not "
            "supported: our processor does not wrap images in <im_start>/<im_end>."
        )
    return dict(
        format=fmt,
        text_config=text_config_from(text_source, llm_type(text_source, text_where)),
        projector_type=config.get("mm_projector_type", "linear"),
        feature_layer=int(config.get("mm_vision_select_layer", -2)),
        select_strategy=config.get("mm_vision_select_feature", "patch"),
        image_aspect_ratio=image_mode(config.get("image_aspect_ratio")),
        model_max_length=int(config.get("tokenizer_model_max_length") or 2048),
        template=options.template,
        source_dtype=text_source.get("torch_dtype") or text_source.get("dtype"),
    )


def tokenizer_dir(options: ConvertOptions, src: Path) -> Path:
    for candidate in (options.tokenizer, src, options.model_base):
        if candidate and has_tokenizer(Path(candidate)):
            return Path(candidate)
    where = f"{src}" + (f" or {options.model_base}" if options.model_base else "")
    raise ConversionError(f"No tokenizer in {where}: pass --tokenizer DIR.")


def base_llm(options: ConvertOptions, what: str) -> tuple[Path, dict]:
    if not options.model_base:
        raise ConversionError(
            f"A {what} needs --model-base DIR (the base LLM it was trained on, e.g. vicuna-7b-v1.5)."
        )
    return options.model_base, read_json(options.model_base / "config.json")


# --------------------------------------------------------------------------------------------------------------
# Key mappers of the original LLaVA family
# --------------------------------------------------------------------------------------------------------------


def original_mapper(linear_count: int) -> Mapper:
    """Original LLaVA-family checkpoint keys (LLM, projector, a CLIP / InternViT / multi-path tower inside) → ours."""
    from ...modeling.modeling_multipath import convert_llava_hr_vision_key

    def map_key(name: str):
        if name.startswith("model.mm_projector"):
            return llava_projector_key(name, linear_count)
        if name.startswith("model.vision_tower.vision_tower.vision_model."):  # CLIP inside the checkpoint
            return "model.vision_tower." + name[len("model.vision_tower.vision_tower.vision_model.") :]
        if name.startswith("model.vision_tower.vision_tower."):  # InternViT inside the checkpoint
            return "model.vision_tower." + name[len("model.vision_tower.vision_tower.") :]
        if name.startswith("model.vision_tower."):  # LLaVA-HR multi-path encoder
            new = convert_llava_hr_vision_key(name[len("model.vision_tower.") :])
            return SKIP if new is None else "model.vision_tower." + new
        if name.startswith("model.vision_resampler"):
            return None
        return llava_llm_key(name)

    return map_key
