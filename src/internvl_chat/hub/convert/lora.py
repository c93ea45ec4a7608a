"""LoRA artifact (LLaVA's `train.py --lora_enable`: PEFT `adapter_config.json` + `adapter_model.*` over the base
LLM, and `non_lora_trainables.bin` with the projector): merged into the base by default (PEFT's arithmetic,
per-module `rank_pattern` / `alpha_pattern` included), or kept as a PEFT adapter over our model (`DST/adapter`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ...keymaps import SKIP, llava_llm_key, strip_peft
from ..checkpoint_io import read_tensors, save_safetensors
from .common import (
    ConversionError,
    ConvertOptions,
    LoraAdapter,
    Plan,
    base_llm,
    config_of,
    num_linear,
    original_fields,
    original_mapper,
    read_json,
    tokenizer_dir,
)
from .towers import clip_folder_key, clip_tower

# `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` → module, A/B (adapter name optional).
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def detect(src: Path, options: ConvertOptions) -> tuple[bool, str]:
    return (src / "adapter_config.json").is_file(), "no adapter_config.json"


def pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern `p` (in order) with `re.match(rf"(.*\\.)?({p})$", module)`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter(src: Path) -> LoraAdapter:
    """The adapter's config and LoRA pairs on our weight names, with the rank and alpha of every module."""
    config_path = src / "adapter_config.json"
    adapter_config = read_json(config_path)
    if adapter_config.get("use_dora"):
        raise ConversionError(f"{config_path}: DoRA adapters are not supported.")
    files = [p for p in (src / "adapter_model.safetensors", src / "adapter_model.bin") if p.is_file()]
    if not files:
        raise ConversionError(f"Missing {src / 'adapter_model.safetensors'} (or adapter_model.bin).")
    try:
        rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
        rank_pattern = dict(adapter_config.get("rank_pattern") or {})
        alpha_pattern = dict(adapter_config.get("alpha_pattern") or {})
    except (KeyError, TypeError, ValueError) as err:
        raise ConversionError(
            f"{config_path}: cannot read r / lora_alpha / rank_pattern / alpha_pattern ({err})."
        ) from err

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    modules: dict[str, str] = {}  # our weight name → the module name PEFT matched its patterns against
    unknown = []
    for name, tensor in read_tensors(files[0]).items():
        match = _LORA_KEY.match(name)
        target = llava_llm_key(match.group(1) + ".weight") if match else None
        if target is None or target == SKIP:
            unknown.append(f"{name} ({files[0].name})")
            continue
        pairs.setdefault(target, {})[match.group(2)] = tensor
        modules[target] = match.group(1)
    incomplete = [t for t, ab in pairs.items() if set(ab) != {"A", "B"}]
    if unknown or incomplete:
        raise ConversionError(f"Unexpected LoRA keys {unknown} / unpaired lora_A/lora_B for {incomplete}.")

    ranks, alphas = {}, {}
    for target, module in modules.items():
        ranks[target] = int(pattern_value(rank_pattern, module, rank))
        alphas[target] = float(pattern_value(alpha_pattern, module, alpha))
        found = pairs[target]["A"].shape[0]
        if found != ranks[target] or pairs[target]["B"].shape[1] != found:
            raise ConversionError(
                f"{config_path}: {module} has rank {ranks[target]} by r / rank_pattern, but its lora_A / lora_B in "
                f"{files[0].name} have rank {found} / {pairs[target]['B'].shape[1]}."
            )
    return LoraAdapter(adapter_config, pairs, ranks, alphas)


def merge_transform(adapter: LoraAdapter):
    """W + scale · B @ A for every adapted weight (PEFT's merge; scale = alpha / r, or alpha / √r with rsLoRA)."""
    rslora = bool(adapter.config.get("use_rslora"))
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))

    def merge(name: str, weight: torch.Tensor) -> torch.Tensor:
        ab = adapter.pairs.get(name)
        if ab is None:
            return weight
        rank, alpha = adapter.ranks[name], adapter.alphas[name]
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        delta = (ab["B"].float() @ ab["A"].float()) * scale
        if fan_in_fan_out:
            delta = delta.T
        return (weight.float() + delta).to(weight.dtype)

    return merge


def plan(src: Path, options: ConvertOptions) -> Plan:
    base, base_config = base_llm(options, "LoRA artifact")
    adapter = read_adapter(src)
    config = config_of(src) or base_config
    tower = clip_tower(config, options, src, [], allow_embedded=False)
    fields = original_fields(src, config, options, "lora", base_config, base / "config.json")
    non_lora = src / "non_lora_trainables.bin"
    if not non_lora.is_file():
        raise ConversionError(f"Missing {non_lora} (the projector trained next to the LoRA).")
    projector = original_mapper(num_linear(fields["projector_type"]))
    streams = [
        (base, llava_llm_key),
        (non_lora, lambda n: projector(strip_peft(n))),
        (tower.folder, clip_folder_key),
    ]
    plan = Plan(tower=tower, tokenizer_dir=tokenizer_dir(options, base), streams=streams, **fields)
    rank, alpha = int(adapter.config["r"]), float(adapter.config["lora_alpha"])
    plan.notes.update(model_base=str(base), lora_rank=rank, lora_alpha=alpha, lora_modules=len(adapter.pairs))
    patterned = [t for t in adapter.pairs if (adapter.ranks[t], adapter.alphas[t]) != (rank, alpha)]
    if patterned:
        plan.notes["lora_pattern_modules"] = len(patterned)  # rank / alpha from rank_pattern / alpha_pattern
    if options.keep_adapter:
        plan.adapter = adapter
        plan.notes["adapter"] = "adapter"
    else:
        plan.transform = merge_transform(adapter)
        plan.notes["merged_lora"] = True
    return plan


def write_adapter(dst: Path, adapter: LoraAdapter) -> Path:
    """The LoRA as a PEFT adapter over our model: keys, target modules and per-module patterns on our names."""
    folder = dst / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    tensors, leaves = {}, set()
    config = dict(adapter.config)
    rank_pattern, alpha_pattern = {}, {}
    for target, ab in sorted(adapter.pairs.items()):
        module = target[: -len(".weight")]
        leaves.add(module.rsplit(".", 1)[-1])
        for part in ("A", "B"):
            tensors[f"base_model.model.{module}.lora_{part}.weight"] = ab[part]
        # One exact pattern per module that differs from the global r / lora_alpha. Without the leading `model.`
        # it matches under both PEFT rules (old: `.*\.{p}$`, current: `(.*\.)?({p})$`).
        pattern = re.escape(module.removeprefix("model."))
        if adapter.ranks[target] != int(config["r"]):
            rank_pattern[pattern] = adapter.ranks[target]
        if adapter.alphas[target] != float(config["lora_alpha"]):
            alpha_pattern[pattern] = adapter.alphas[target]
    save_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    # [IMPORTANT] a plain list of names would also match the CLIP tower's q_proj/k_proj/v_proj in our model;
    # a regex anchored on the language model keeps the LoRA where the original put it.
    config["target_modules"] = rf"^model\.language_model\..*\.({'|'.join(sorted(leaves))})$"
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    config["base_model_name_or_path"] = str(dst)
    config.pop("modules_to_save", None)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
