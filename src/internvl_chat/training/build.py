"""Builds the model + processor a recipe trains, from one of three starting points (the recipe's `model:` block).

    from internvl_chat.training.build import ModelConfig, build_model
    model, processor = build_model(ModelConfig(preset="llava-v1.5-7b", tiny=True,
                                               tokenizer="tests/fixtures/tokenizers/vicuna-v1.5"))

1. `model_name_or_path: DIR` — a saved internvl-chat folder (a previous stage, `internvl-chat create`, a converted
   original checkpoint). QLoRA (`bits: 4|8`) quantizes its LLM with bitsandbytes on load.
2. `preset: NAME` + `language_model: LLM` + `vision_tower: TOWER` (+ `vision_tower_slow: FILE` for LLaVA-HR) — the
   original stage-1 start: pretrained LLM and tower, new random projector. The LLM (e.g. `lmsys/vicuna-7b-v1.5`)
   and tower (`openai/clip-vit-large-patch14-336`, an InternViT-6B folder) are loaded with transformers and
   *moved* into the model (no copy); the tokenizer is the LLM's, with `<image>` and pad added and the embeddings
   resized (new rows = mean embedding).
3. `preset: NAME` + `tiny: true` (+ `tokenizer`, `seed`) — `internvl-chat create --tiny` in memory (tests, demo).
   The same seed gives the same random tower in stage 1 and stage 2, so a stage-1 projector fits the stage-2 base.

Then, for every start: `pretrain_mm_mlp_adapter` loads a stage-1 projector artifact; `freeze_vision: false` on a
multi-path model adds the three adapters (zero-init, identity at start); `input_image_size` changes the
multi-path input side (LLaVA-HR stage 1 at 384, stage 2 at 768); `image_aspect_ratio` sets the processor mode.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..loading import DTYPE_NAMES, torch_dtype
from .blocks import recipe_block

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelConfig:
    model_name_or_path: str | None = None
    preset: str | None = None
    tiny: bool = False
    tokenizer: str | None = None
    seed: int = 0
    language_model: str | None = None
    vision_tower: str | None = None
    vision_tower_slow: str | None = None
    pretrain_mm_mlp_adapter: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    image_aspect_ratio: str | None = None
    input_image_size: int | None = None
    model_max_length: int | None = None
    bits: int = 16

    @classmethod
    def from_dict(cls, values: dict | None) -> ModelConfig:
        config = recipe_block(cls, values, "model")
        if config.model_name_or_path is None and config.preset is None:
            raise ValueError("The recipe's model block needs `model_name_or_path` or `preset`.")
        if config.dtype not in ("auto", *DTYPE_NAMES):
            raise ValueError(f"model.dtype must be one of {sorted(('auto', *DTYPE_NAMES))}, got {config.dtype!r}")
        if config.bits not in (4, 8, 16):
            raise ValueError(f"model.bits must be 4, 8 (QLoRA) or 16, got {config.bits}")
        return config


def _from_folder(cfg: ModelConfig, freeze_vision: bool):
    from transformers import AutoConfig, AutoProcessor

    from ..loading import check_remote_code, quantization_config
    from ..modeling import InternVLChatForConditionalGeneration

    # Our model type loads with the installed classes: a folder's own Python files never run here.
    check_remote_code(cfg.model_name_or_path, trust_remote_code=False)
    config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    _adjust_config(config, cfg, freeze_vision)
    kwargs = {"config": config, "dtype": torch_dtype(cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.bits in (4, 8):
        dtype = torch_dtype(cfg.dtype)
        kwargs["quantization_config"] = quantization_config(
            cfg.bits, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        )
    model = InternVLChatForConditionalGeneration.from_pretrained(cfg.model_name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(cfg.model_name_or_path)
    return model, processor


def _adjust_config(config, cfg: ModelConfig, freeze_vision: bool):
    if config.is_multipath_encoder:
        # The adapters exist only when the vision side trains (LLaVA-HR); a stage-1 model has none, and the
        # stage-2 model gets them zero-initialised (identity) by the model's _init_weights.
        config.vision_config.use_adapters = not freeze_vision
        if cfg.input_image_size:
            config.vision_config.input_image_size = int(cfg.input_image_size)


def _from_preset(cfg: ModelConfig, freeze_vision: bool):
    from ..factories import create

    if cfg.language_model is None:
        if cfg.vision_tower is not None:
            raise ValueError("vision_tower needs language_model too (or use model_name_or_path)")
        if not cfg.tiny:
            raise ValueError(
                f"preset {cfg.preset!r} without language_model/vision_tower would train random full-size weights; "
                "pass tiny: true, or language_model + vision_tower, or model_name_or_path"
            )
        model, processor, _ = create(cfg.preset, None, tokenizer=cfg.tokenizer, tiny=cfg.tiny, seed=cfg.seed)
        if model.config.is_multipath_encoder and (not freeze_vision or cfg.input_image_size):
            # Rebuild with the adjusted vision config from the same seed: identical tower, LLM and projector.
            from ..modeling import InternVLChatForConditionalGeneration

            state = model.state_dict()
            config = model.config
            _adjust_config(config, cfg, freeze_vision)
            torch.manual_seed(cfg.seed)
            model = InternVLChatForConditionalGeneration(config)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("model.vision_tower.align_stages_latent.") for k in missing):
                raise RuntimeError(f"rebuild mismatch: missing {missing}, unexpected {unexpected}")
        return model, processor
    return _from_parts(cfg, freeze_vision)


def _from_parts(cfg: ModelConfig, freeze_vision: bool):
    """Pretrained LLM + pretrained tower + new projector: the original LLaVA stage-1 start."""
    from transformers import AutoModelForCausalLM

    from ..factories import build_processor, create, prepare_tokenizer
    from ..modeling.modeling_internvl_chat import InternVLChatProjector
    from ..presets import get_preset

    dtype = torch_dtype(cfg.dtype)
    preset = get_preset(cfg.preset)
    # Config + processor of the preset with the LLM's tokenizer; weights stay on the meta device (no memory).
    skeleton, _, _ = create(cfg.preset, None, tokenizer=cfg.tokenizer or cfg.language_model, weights=False)
    config = skeleton.config
    _adjust_config(config, cfg, freeze_vision)
    tokenizer, vocab_size = prepare_tokenizer(
        cfg.tokenizer or cfg.language_model, cfg.model_max_length or preset.model_max_length
    )
    llm = AutoModelForCausalLM.from_pretrained(
        cfg.language_model, dtype=dtype, attn_implementation=cfg.attn_implementation
    )
    llm.resize_token_embeddings(vocab_size, mean_resizing=True)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(llm.config, key, getattr(config.text_config, key))
    config.text_config = llm.config

    with torch.device("meta"):
        from ..modeling import InternVLChatForConditionalGeneration

        model = InternVLChatForConditionalGeneration(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = _load_tower(config, cfg, dtype)
    projector = InternVLChatProjector(config).to(dtype)
    model.model.multi_modal_projector = projector
    for module in projector.modules():  # LLaVA: normal(0, initializer_range) weights, zero biases
        if isinstance(module, torch.nn.Linear):
            model._init_weights(module)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")
    model.generation_config = skeleton.generation_config
    processor = build_processor(cfg.preset, tokenizer, config.image_seq_length, tiny=False)
    logger.info("built %s from %s + %s", cfg.preset, cfg.language_model, cfg.vision_tower)
    return model, processor


def _load_tower(config, cfg: ModelConfig, dtype):
    from transformers import CLIPVisionModel

    from ..modeling.modeling_internvl_chat import build_vision_tower

    vision = config.vision_config
    if cfg.vision_tower is None:
        raise ValueError("language_model needs vision_tower too")
    if config.is_multipath_encoder:
        tower = build_vision_tower(vision).to(dtype)
        fast = CLIPVisionModel.from_pretrained(cfg.vision_tower, dtype=dtype)
        tower.fast_vision_tower.load_state_dict(fast.state_dict())
        if cfg.vision_tower_slow is None:
            raise ValueError("the multi-path encoder needs vision_tower_slow (a ConvNeXt state-dict file)")
        _load_state_file(tower.slow_vision_tower, cfg.vision_tower_slow, prefixes=("visual.trunk.", "trunk."))
        return tower
    if vision.model_type == "clip_vision_model":
        return CLIPVisionModel.from_pretrained(cfg.vision_tower, dtype=dtype)
    tower = build_vision_tower(vision).to(dtype)
    _load_state_file(tower, cfg.vision_tower, prefixes=("vision_model.", "model.vision_tower."))
    return tower


def _load_state_file(module: torch.nn.Module, path: str, prefixes: tuple[str, ...]):
    """Loads a checkpoint folder/file into `module`, stripping known prefixes; strict on the module's keys."""
    p = Path(path)
    if not p.exists():
        # A Hub id (e.g. OpenGVLab/InternViT-6B-224px): fetch only the weight files.
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.bin", "*.json"]))
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
    else:
        files = [p]
    state = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            state.update(torch.load(str(file), map_location="cpu", weights_only=True))
    own = module.state_dict()
    mapped = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key in own:
            mapped[key] = value
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(f"{path}: {len(missing)} weights of {type(module).__name__} missing, e.g. {missing[:5]}")
    module.load_state_dict(mapped)


def build_model(cfg: ModelConfig, freeze_vision: bool = True):
    """(model, processor) for the recipe; see the module docstring."""
    if cfg.model_name_or_path:
        model, processor = _from_folder(cfg, freeze_vision)
    else:
        model, processor = _from_preset(cfg, freeze_vision)
    if cfg.attn_implementation and model.config._attn_implementation != cfg.attn_implementation:
        # Presets are built in code (not from_pretrained) and a parts-built model only set it on the LLM.
        # "internvl_varlen" (padding-free packed rows) falls back to SDPA wherever no cu_seq_lens are passed.
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.pretrain_mm_mlp_adapter:
        from .trainer import load_projector

        load_projector(model, cfg.pretrain_mm_mlp_adapter)
    if model.config.is_multipath_encoder and cfg.input_image_size:
        size = int(cfg.input_image_size)
        processor.image_processor.size = {"shortest_edge": size}
        processor.image_processor.crop_size = {"height": size, "width": size}
    if cfg.image_aspect_ratio:
        processor.image_processor.image_aspect_ratio = cfg.image_aspect_ratio
    if cfg.model_max_length:
        processor.tokenizer.model_max_length = cfg.model_max_length
    if cfg.dtype not in ("float32", "auto") and cfg.bits == 16:
        model = model.to(torch_dtype(cfg.dtype))
    return model, processor


def build_model_shapes(cfg: ModelConfig, freeze_vision: bool = True):
    """The recipe's model on the meta device, for `train --dry-run`: the real architecture and parameter counts,
    without reading or downloading any weights (`internvl-chat create --no-weights` builds the same way).

    A folder start reads only its config.json; a preset start builds the preset's config with the recipe's
    tokenizer (`model.tokenizer`, else the LLM's), so the table matches the real run's shapes. Tiny presets are
    built for real (seconds). The stage-1 projector (`pretrain_mm_mlp_adapter`) is not read.
    """
    from ..modeling import InternVLChatForConditionalGeneration

    if cfg.model_name_or_path:
        from transformers import AutoConfig

        from ..loading import check_remote_code

        check_remote_code(cfg.model_name_or_path, trust_remote_code=False)
        config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    elif cfg.tiny:
        return build_model(dataclasses.replace(cfg, pretrain_mm_mlp_adapter=None), freeze_vision)[0]
    else:
        from ..factories import create

        skeleton, _, _ = create(cfg.preset, None, tokenizer=cfg.tokenizer or cfg.language_model, weights=False)
        config = skeleton.config
    _adjust_config(config, cfg, freeze_vision)
    with torch.device("meta"):
        return InternVLChatForConditionalGeneration(config)
