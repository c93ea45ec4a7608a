"""Trainable sets of the two-stage LLaVA recipes, and the optimizer parameter groups with their learning rates.

    from internvl_chat.training.stages import StageConfig, apply_stage, parameter_groups, trainable_table
    stage = StageConfig.from_dict({"stage": "align"})          # projector (+ multi-path fusion) only
    parts = apply_stage(model, stage)                          # sets requires_grad, returns the part table
    logger.info("\\n%s", trainable_table(model, stage, learning_rate=1e-3))
    groups = parameter_groups(model, stage, learning_rate=2e-5, weight_decay=0.0, decay_names=...)

Stages and the original training scripts' flags they mirror:

| recipe key | meaning | origin |
| --- | --- | --- |
| `stage: align` | projector (`tune_mm_mlp_adapter`) + multi-path fusion (`align_stages`) | LLaVA, LLaVA-HR stage 1 |
| `stage: finetune` | LLM + lm_head + projector (+ fusion) | LLaVA stage 2 |
| `freeze_llm` | override: freeze (True) or train (False) the LLM in any stage | InternVL `freeze_llm` |
| `freeze_mm_mlp_adapter` | freeze the projector | LLaVA |
| `freeze_vision: false` | train the whole vision side (both towers, the adapters `align_stages_latent`) | LLaVA-HR |
| `tune_vit_from_layer: N` | train vision blocks >= N (embeddings and norms stay frozen) | ShareGPT4V |
| `tune_vit_pos_embedding` | train the tower's position embedding | InternVL |
| `mm_projector_lr`, `vision_tower_lr` | separate learning rates (None: the main `learning_rate`) | LLaVA, ShareGPT4V |

Blocks of the tower that the model never uses (those after the select layer, CLIP's `post_layernorm`) are never
trained: they would get no gradient, so DDP would complain and the "trainable set changes" check would be false.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict

from torch import nn

from ..keymaps import strip_peft
from .blocks import recipe_block

logger = logging.getLogger(__name__)

STAGES = ("align", "finetune")

# Parts of the model, in table order, as (name, parameter-name prefix). The multi-path fusion and adapters are
# listed before the tower so that the first matching prefix wins.
PARTS = (
    ("vision fusion (align_stages)", "model.vision_tower.align_stages."),
    ("vision adapters (align_stages_latent)", "model.vision_tower.align_stages_latent."),
    ("vision tower", "model.vision_tower."),
    ("projector", "model.multi_modal_projector."),
    ("language model", "model.language_model."),
    ("lm_head", "lm_head."),
)


@dataclasses.dataclass
class StageConfig:
    """What a recipe trains. Field names follow the original projects' flags (see the module docstring)."""

    stage: str = "finetune"
    freeze_llm: bool | None = None
    freeze_mm_mlp_adapter: bool = False
    freeze_vision: bool = True
    tune_vit_from_layer: int | None = None
    tune_vit_pos_embedding: bool = False
    mm_projector_lr: float | None = None
    vision_tower_lr: float | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}: expected one of {STAGES}.")
        if self.tune_vit_from_layer is not None and self.tune_vit_from_layer < 0:
            self.tune_vit_from_layer = None  # ShareGPT4V's default -1 means "do not tune the tower"
        if self.tune_vit_from_layer is not None and not self.freeze_vision:
            raise ValueError("Use `freeze_vision: false` (whole vision side) or `tune_vit_from_layer`, not both.")

    @classmethod
    def from_dict(cls, values: dict | None) -> StageConfig:
        return recipe_block(cls, values, "stage")

    @property
    def train_llm(self) -> bool:
        return (self.stage == "finetune") if self.freeze_llm is None else not self.freeze_llm

    @property
    def train_vision(self) -> bool:
        return not self.freeze_vision or self.tune_vit_from_layer is not None


def part_of(name: str) -> str:
    """Table part of a parameter name ('lora' for LoRA weights)."""
    if ".lora_" in name:
        return "lora"
    name = strip_peft(name)
    for part, prefix in PARTS:
        if name.startswith(prefix):
            return part
    return "other"


def _vision_blocks(tower) -> tuple[str, int] | None:
    """(block-name prefix inside the tower, number of blocks) of a single-path tower (CLIP or InternViT)."""
    encoder = getattr(tower, "encoder", None)
    layers = getattr(encoder, "layers", None)
    return ("encoder.layers.", len(layers)) if layers is not None else None


def unused_vision_parameters(model) -> set[str]:
    """Names (relative to the tower) of tower parameters that never get a gradient with the model's select layer.

    Single-path towers return `hidden_states[vision_feature_layer]`: with n blocks and layer -k, blocks with
    0-based index > n - k never run for the features, and CLIP's `post_layernorm` is never used.
    """
    config = model.config
    tower = model.model.vision_tower
    if config.is_multipath_encoder:
        # The fast CLIP's CLS token and post-norm are dropped by the multi-path encoder.
        return {"fast_vision_tower.embeddings.class_embedding"} | {
            n for n, _ in tower.named_parameters() if n.startswith("fast_vision_tower.post_layernorm.")
        }
    blocks = _vision_blocks(tower)
    unused = {n for n, _ in tower.named_parameters() if n.startswith("post_layernorm.")}
    if blocks is None:
        return unused
    prefix, n_blocks = blocks
    layer = config.vision_feature_layer
    last_used = n_blocks + layer if layer < 0 else layer - 1  # 0-based index of the last block used
    for name, _ in tower.named_parameters():
        match = re.match(re.escape(prefix) + r"(\d+)\.", name)
        if match and int(match.group(1)) > last_used:
            unused.add(name)
    return unused


def _vision_trainable(model, stage: StageConfig, name: str) -> bool:
    """Whether tower parameter `name` (relative to the tower) is trained under `stage`."""
    if name.startswith("align_stages."):
        return True  # the fusion is trained in every stage of LLaVA-HR (it is part of the projector side)
    if not stage.freeze_vision:
        return True
    if stage.tune_vit_pos_embedding and "position_embedding" in name:
        return True
    if stage.tune_vit_from_layer is not None:
        blocks = _vision_blocks(model.model.vision_tower)
        if blocks is None:
            raise ValueError("tune_vit_from_layer needs a single-path tower (CLIP or InternViT) with encoder.layers")
        match = re.match(re.escape(blocks[0]) + r"(\d+)\.", name)
        # ShareGPT4V: blocks >= N train; embeddings, pre-norm and the final norm stay frozen.
        return bool(match) and int(match.group(1)) >= stage.tune_vit_from_layer
    return False


def apply_stage(model, stage: StageConfig) -> dict[str, tuple[int, int]]:
    """Sets `requires_grad` on the bare model (before PEFT) for `stage`; returns {part: (trainable, total)}.

    # [IMPORTANT] the multi-path adapters only exist when the model was built with `vision_config.use_adapters`
    # (LLaVA-HR: the recipe's `freeze_vision: false`); `build_model` sets it from the recipe before loading.
    """
    if stage.freeze_vision is False and model.config.is_multipath_encoder:
        if not model.config.use_vision_adapters:
            raise ValueError(
                "freeze_vision: false needs the multi-path adapters: build the model with "
                "vision_config.use_adapters = True (internvl_chat.training.build_model does it from the recipe)."
            )
    unused = unused_vision_parameters(model)
    for name, param in model.named_parameters():
        part = part_of(name)
        if part in ("projector",):
            train = not stage.freeze_mm_mlp_adapter
        elif part in ("language model", "lm_head"):
            train = stage.train_llm
        elif part.startswith("vision"):
            rel = name.removeprefix("model.vision_tower.")
            train = rel not in unused and _vision_trainable(model, stage, rel)
        else:
            train = False
        param.requires_grad_(train)
    return count_parts(model)


def count_parts(model) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = OrderedDict((part, [0, 0]) for part, _ in PARTS)
    for name, param in model.named_parameters():
        part = part_of(name)
        if ".original_module." in name:
            continue  # PEFT keeps a frozen copy of modules_to_save; count the trained copy only
        entry = counts.setdefault(part, [0, 0])
        entry[1] += param.numel()
        if param.requires_grad:
            entry[0] += param.numel()
    return OrderedDict((k, (v[0], v[1])) for k, v in counts.items() if v[1] > 0)


def learning_rate_of(part: str, stage: StageConfig, learning_rate: float) -> float:
    if part == "projector" and stage.mm_projector_lr is not None:
        return stage.mm_projector_lr
    if part.startswith("vision") and part != "vision fusion (align_stages)" and stage.vision_tower_lr is not None:
        return stage.vision_tower_lr
    return learning_rate


def parameter_groups(
    model: nn.Module, stage: StageConfig, learning_rate: float, weight_decay: float, decay_names: set[str]
) -> list[dict]:
    """Optimizer groups: one per (learning rate, weight decay) pair, with LLaVA's rule for the projector LR.

    `decay_names` is Trainer's `get_decay_parameter_names` (no decay on biases and norms). Groups carry only
    `params`, `lr` and `weight_decay` (DeepSpeed copies the group dicts).
    """
    groups: dict[tuple, dict] = OrderedDict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        lr = learning_rate_of(part, stage, learning_rate)
        wd = weight_decay if name in decay_names else 0.0
        label = part if lr != learning_rate else "default"
        key = (label, lr, wd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr, "weight_decay": wd}
        groups[key]["params"].append(param)
    # The main learning rate first: Trainer logs the learning rate of group 0.
    return sorted(groups.values(), key=lambda g: g["lr"] != learning_rate)


def trainable_table(model, stage: StageConfig | None = None, learning_rate: float | None = None) -> str:
    """A Markdown-ish table: part, trainable / total parameters, learning rate."""
    counts = count_parts(model)
    rows = [("part", "trainable", "total", "lr")]
    total_train = total = 0
    for part, (trainable, n) in counts.items():
        lr = "-"
        if trainable and learning_rate is not None and stage is not None:
            lr = f"{learning_rate_of(part, stage, learning_rate):g}"
        rows.append((part, f"{trainable:,}", f"{n:,}", lr))
        total_train += trainable
        total += n
    rows.append(("total", f"{total_train:,}", f"{total:,}", f"{100 * total_train / max(total, 1):.2f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    header = f"trainable parameters (stage {stage.stage})" if stage is not None else "trainable parameters"
    return header + "\n" + "\n".join(lines)
