"""`internvl-chat train RECIPE.yaml [--key value ...]`: run a training recipe with TRL's SFTTrainer.

    internvl-chat train recipes/tiny/llava-align.yaml                          # CPU, seconds
    internvl-chat train recipes/llava-v1.5-7b-finetune.yaml --learning_rate 1e-5 --data.max_samples 1000
    internvl-chat train RECIPE.yaml --dry-run                                  # build, print the trainable table
    internvl-chat train RECIPE.yaml --resume                                   # from the last checkpoint
    accelerate launch --num_processes 8 -m internvl_chat.training.train RECIPE.yaml        # multi-GPU (DDP)
    accelerate launch --config_file src/internvl_chat/training/configs/fsdp.yaml -m internvl_chat.training.train R.yaml
    deepspeed -m internvl_chat.training.train RECIPE.yaml                      # with training.deepspeed: zero3

A recipe has five blocks (every key is a field of the dataclass it feeds, documented there; `--print-recipe`
shows a recipe after the overrides):

    model:    build.ModelConfig       what to start from (a folder, pretrained LLM + tower, or a tiny preset)
    stage:    stages.StageConfig      align / finetune, freeze_* flags, tune_vit_from_layer, mm_projector_lr...
    data:     DataConfig (below)      file(s), image folder, template, max_length, over_length, packing
    lora:     LoraSettings (below)    enabled, r, alpha, dropout (QLoRA: model.bits 4 or 8)
    training: trainer.VisionSFTConfig TRL / transformers arguments (output_dir, lr, batch, bf16, deepspeed...)

Overrides: `--training.learning_rate 2e-5` (dotted path) or `--learning_rate 2e-5` (a key that exists in exactly one
block); values are parsed as YAML (`--bf16 false`, `--lora.r 64`). `deepspeed: zero2|zero3|zero3_offload` names the
JSON configs shipped in `internvl_chat/training/configs/`.
At the start the trainable-parameter table is logged; at the end the output folder holds the model (or the LoRA
adapter), the processor, `mm_projector.safetensors`, `loss_curve.png` and `train_summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from .blocks import recipe_block

logger = logging.getLogger(__name__)

BLOCKS = ("model", "stage", "data", "lora", "training")
DEEPSPEED_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}


@dataclasses.dataclass
class DataConfig:
    """The recipe's `data:` block."""

    data_path: str | None = None
    image_folder: str | None = None
    builtin: str | None = None  # "toy": the demo's digits + letters, written under `builtin_folder`
    builtin_folder: str | None = None
    builtin_split: str = "finetune"  # align | finetune (the toy set has captions and QA pairs)
    template: str | None = None  # None: the processor's chat template (the model's finetune template)
    template_kwargs: dict = dataclasses.field(default_factory=dict)
    max_length: int | None = None  # None: tokenizer.model_max_length (image tokens count)
    over_length: str = "truncate"  # error | skip | truncate (never inside image tokens)
    packing: bool = False
    on_error: str = "raise"  # raise | skip (missing / corrupt images, malformed records)
    drop_over_length: bool = False  # exact length filter before training (tokenizes everything once)
    max_samples: int | None = None
    eval_path: str | None = None

    @classmethod
    def from_dict(cls, values: dict | None) -> DataConfig:
        return recipe_block(cls, values, "data")


@dataclasses.dataclass
class LoraSettings:
    """The recipe's `lora:` block (LLaVA: r 128, alpha 256, dropout 0.05; projector trained in full)."""

    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    bias: str = "none"
    merge: bool = False  # also write the merged full model to OUTPUT/merged at the end

    @classmethod
    def from_dict(cls, values: dict | None) -> LoraSettings:
        return recipe_block(cls, values, "lora")


# ---------------------------------------------------------------------------------------------------------------
# Recipe files and overrides


def _number(value):
    """YAML 1.1 reads `2e-5` (no dot) as a string; recipes and overrides mean the float."""
    if isinstance(value, dict):
        return {k: _number(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def load_recipe(path: str | os.PathLike) -> dict:
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(recipe) - set(BLOCKS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; a recipe has {BLOCKS}")
    return {block: _number(dict(recipe.get(block) or {})) for block in BLOCKS}


def _known_keys(block: str) -> set[str]:
    from .build import ModelConfig
    from .stages import StageConfig
    from .trainer import VisionSFTConfig

    classes = {
        "model": ModelConfig,
        "stage": StageConfig,
        "data": DataConfig,
        "lora": LoraSettings,
        "training": VisionSFTConfig,
    }
    return {f.name for f in dataclasses.fields(classes[block])}


def _suggest(key: str, recipe: dict, block: str | None = None) -> str:
    """ "; did you mean --training.learning_rate?" for a mistyped override key (closest known keys)."""
    import difflib

    candidates = {
        f"{b}.{name}": name for b in ([block] if block else BLOCKS) for name in set(recipe[b]) | _known_keys(b)
    }
    close = difflib.get_close_matches(key, list(set(candidates.values())), n=3, cutoff=0.6)
    flags = [f"--{full}" for full, name in sorted(candidates.items()) if name in close]
    return f"; did you mean {' or '.join(flags[:3])}?" if flags else f" (blocks: {', '.join(BLOCKS)})"


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Applies `--a.b value` / `--key value` pairs (values parsed as YAML) to `recipe` in place."""
    if len(overrides) % 2:
        raise ValueError(f"overrides come in `--key value` pairs, got {overrides}")
    for flag, raw in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"expected --key, got {flag!r}")
        key = flag[2:].replace("-", "_") if "." not in flag else flag[2:]
        value = _number(yaml.safe_load(raw))
        if "." in key:
            block, name = key.split(".", 1)
            if block not in BLOCKS:
                raise ValueError(f"unknown block {block!r} in {flag}; blocks: {BLOCKS}")
            if name not in recipe[block] and name not in _known_keys(block):
                raise ValueError(f"unknown recipe key {flag}{_suggest(name, recipe, block)}")
        else:
            owners = [b for b in BLOCKS if key in recipe[b]] or [b for b in BLOCKS if key in _known_keys(b)]
            if len(owners) > 1:
                raise ValueError(f"--{key} is in several blocks {owners}: use --BLOCK.{key}, e.g. --{owners[0]}.{key}")
            if not owners:
                raise ValueError(f"unknown recipe key --{key}{_suggest(key, recipe)}")
            block, name = owners[0], key
        recipe[block][name] = value
    return recipe


def _resolve_deepspeed(training: dict):
    value = training.get("deepspeed")
    if isinstance(value, str) and value in DEEPSPEED_CONFIGS:
        training["deepspeed"] = str(resources.files(__package__).joinpath("configs", DEEPSPEED_CONFIGS[value]))


# ---------------------------------------------------------------------------------------------------------------
# Data


def build_dataset(data: DataConfig, path: str | None = None):
    from ..data import VisionChatDataset

    path = path or data.data_path
    image_folder = data.image_folder
    if data.builtin and path is None:
        if data.builtin != "toy":
            raise ValueError(f"unknown builtin dataset {data.builtin!r} (known: toy)")
        from .toydata import write_toy_dataset

        folder = data.builtin_folder or os.path.join(os.environ.get("TMPDIR", "/tmp"), "internvl-chat-toy")
        paths = write_toy_dataset(folder)
        path, image_folder = paths[data.builtin_split], paths["image_folder"]
    if path is None:
        raise ValueError("the data block needs data_path (or builtin: toy)")
    dataset = VisionChatDataset.from_file(path, image_folder=image_folder, on_error=data.on_error)
    if data.max_samples is not None and data.max_samples < len(dataset):
        dataset = VisionChatDataset(
            list(dataset.samples[: data.max_samples]), on_error=data.on_error, load_images=dataset.load_images
        )
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Run


def run(recipe: dict, callbacks: list | None = None, resume: str | bool | None = None) -> dict:
    """Runs a parsed recipe (see `load_recipe` / `apply_overrides`); returns the summary written to disk."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    from .build import ModelConfig, build_model
    from .collator import VisionChatCollator
    from .stages import StageConfig, apply_stage
    from .trainer import VisionSFTConfig, VisionSFTTrainer, lora_config

    started = time.time()
    stage = StageConfig.from_dict(recipe["stage"])
    model_cfg = ModelConfig.from_dict(recipe["model"])
    data_cfg = DataConfig.from_dict(recipe["data"])
    lora = LoraSettings.from_dict(recipe["lora"])
    training = dict(recipe["training"])
    _resolve_deepspeed(training)
    # LLaVA's names → transformers 5 names.
    if "warmup_ratio" in training:
        training["warmup_steps"] = float(training.pop("warmup_ratio"))
    # Recipes say gradient_checkpointing (LLaVA's name, every transformers 5.x); 5.25+ calls it
    # activation_checkpointing and warns whenever the old name is set (TRL's config sets it by default): pass the
    # name the installed version has.
    defaults = {f.name: f.default for f in dataclasses.fields(VisionSFTConfig)}
    if "activation_checkpointing" in defaults:
        old = training.pop("gradient_checkpointing", defaults["gradient_checkpointing"])
        training.setdefault("activation_checkpointing", old)
        training["gradient_checkpointing"] = None
        if "gradient_checkpointing_kwargs" in training:
            training.setdefault("activation_checkpointing_kwargs", training.pop("gradient_checkpointing_kwargs"))
    training.setdefault("save_full_model", stage.stage != "align")  # LLaVA stage 1 keeps only the projector
    training.setdefault("report_to", "none")
    # [IMPORTANT] our collator tokenizes and needs the raw `messages` / `images` / `id`: no TRL preparation, no
    # column removal. max_length is the collator's (data.max_length), not TRL's truncation.
    training.update(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    args = VisionSFTConfig(**training)
    set_seed(args.seed)

    if lora.enabled and stage.train_vision:
        raise ValueError("LoRA recipes train the LLM through adapters; training the vision tower too is not supported")
    model, processor = build_model(model_cfg, freeze_vision=stage.freeze_vision)
    apply_stage(model, stage)
    peft_config = None
    if lora.enabled:
        if model_cfg.bits in (4, 8):
            from peft import prepare_model_for_kbit_training

            checkpointing = bool(args.gradient_checkpointing)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        peft_config = lora_config(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, bias=lora.bias)

    collator = VisionChatCollator(
        processor,
        template=data_cfg.template,
        max_length=data_cfg.max_length,
        over_length=data_cfg.over_length,
        packing=data_cfg.packing,
        template_kwargs=data_cfg.template_kwargs,
    )
    dataset = build_dataset(data_cfg)
    if data_cfg.drop_over_length:
        dataset = dataset.drop_over_length(collator)
    eval_dataset = build_dataset(data_cfg, data_cfg.eval_path) if data_cfg.eval_path else None

    trainer = VisionSFTTrainer(
        model=model,
        args=args,
        stage=stage,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if any(isinstance(c, ProgressCallback) for c in callbacks or []):
        # A caller's own progress display (the demo's bar with the running loss) replaces the trainer's bar and
        # its raw log-dict lines.
        for callback in list(trainer.callback_handler.callbacks):
            if type(callback) in (ProgressCallback, PrinterCallback):  # exact types: the caller's is a subclass
                trainer.remove_callback(callback)
    trainer.log_trainable()
    leading = dataset.leading_assistant_ids()
    if leading:
        logger.warning(
            "data: %d sample(s) start with an assistant turn; it is dropped as the original preprocessing does "
            "(first ids: %s)",
            len(leading),
            ", ".join(map(str, leading[:5])),
        )
    logger.info(
        "data: %d samples from %s, template %s, max_length %s, over_length %s, packing %s",
        len(dataset),
        data_cfg.data_path or data_cfg.builtin,
        data_cfg.template or "(processor's)",
        collator.max_length,
        data_cfg.over_length,
        data_cfg.packing,
    )
    if resume in (True, "auto", "latest", "true"):
        resume = get_last_checkpoint(args.output_dir)
        logger.info("resuming from %s", resume or "scratch (no checkpoint found)")
    result = trainer.train(resume_from_checkpoint=resume or None)
    written = trainer.save_stage_artifacts(processor)
    if lora.enabled and lora.merge and trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(os.path.join(args.output_dir, "merged"))
        processor.save_pretrained(os.path.join(args.output_dir, "merged"))
        written["merged"] = os.path.join(args.output_dir, "merged")
    stats = collator.log_stats()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "output_dir": args.output_dir,
        "stage": stage.stage,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(time.time() - started, 1),
        "collator": stats,
        "dropped_leading_assistant": len(leading),
        "written": written,
    }
    if trainer.is_world_process_zero():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, "train_summary.json").write_text(json.dumps(summary, indent=2))
    summary["trainer"] = trainer
    return summary


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="internvl-chat train",
        description=__doc__.splitlines()[0],
        epilog="Any other --key value pair overrides the recipe (e.g. --learning_rate 1e-4 --data.max_samples 64).",
    )
    parser.add_argument("recipe", help="recipe YAML (recipes/*.yaml, recipes/tiny/*.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", help="resume from CHECKPOINT (default: the last one)")
    parser.add_argument("--dry-run", action="store_true", help="build model and data, log the table, do not train")
    parser.add_argument("--print-recipe", action="store_true", help="print the recipe after overrides and exit")
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args, overrides = parser.parse_known_args(argv)
    # INFO for our messages only: a root logger at INFO also prints every library's (matplotlib's "generated new
    # fontManager", ...).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("internvl_chat").setLevel(logging.INFO)
    recipe = apply_overrides(load_recipe(args.recipe), overrides)
    if args.print_recipe:
        sys.stdout.write(yaml.safe_dump(recipe, sort_keys=False))
        return 0
    if args.dry_run:
        from .build import ModelConfig, build_model_shapes
        from .stages import StageConfig, apply_stage, trainable_table

        stage = StageConfig.from_dict(recipe["stage"])
        # Meta device: the table of a 13B recipe without downloading (or reading) a single weight.
        model = build_model_shapes(ModelConfig.from_dict(recipe["model"]), freeze_vision=stage.freeze_vision)
        apply_stage(model, stage)
        sys.stdout.write(trainable_table(model, stage, recipe["training"].get("learning_rate")) + "\n")
        return 0
    summary = run(recipe, resume=args.resume)
    summary.pop("trainer")
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
