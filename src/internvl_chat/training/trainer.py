"""TRL `SFTTrainer` integration for the LLaVA-family stages: parameter groups, modality grouping, stage artifacts.

    from internvl_chat.training.trainer import VisionSFTConfig, VisionSFTTrainer
    args = VisionSFTConfig(output_dir="out/x", learning_rate=1e-3, group_by_modality_length=True)
    trainer = VisionSFTTrainer(model=model, args=args, stage=stage, train_dataset=ds, data_collator=collator,
                               processing_class=processor, peft_config=lora_config(model, r=128, alpha=256))
    trainer.train(resume_from_checkpoint=None)
    trainer.save_stage_artifacts()          # model / adapter, processor, mm_projector.safetensors, loss_curve.png

What SFTTrainer gives as is: the training loop, accelerate / DeepSpeed / FSDP, bf16 / tf32, gradient checkpointing,
checkpoints and resume (optimizer, scheduler, RNG states, skipped batches), the fused LM head (no full logits), PEFT.
What is added here (the LLaVA `train.py` pieces):

* `create_optimizer`: parameter groups with `mm_projector_lr` / `vision_tower_lr` (stages.parameter_groups);
* `group_by_modality_length`: LLaVA's sampler (megabatches of one modality, image or text-only), seeded per epoch so
  that resuming replays the same order;
* our collator (labels from template spans, packing) instead of TRL's vision collator, which keeps image tokens in
  the labels and refuses packing for vision data;
* the stage-1 artifact `mm_projector.safetensors` (projector + multi-path fusion, our key names) and
  `load_projector` to start stage 2 from it;
* LoRA with LLaVA's target rule (`lora_config`): every Linear of the LLM, not lm_head, tower or projector; the
  projector is trained in full through `modules_to_save`;
* a loss-curve PNG and `loss_history.json` at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ..data.dataset import hf_view
from ..data.formats import modality_length
from ..modeling.modeling_internvl_chat import supervised_cross_entropy
from .stages import StageConfig, parameter_groups, trainable_table

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"
# Stage-1 trainable modules saved in the projector artifact (our state-dict names).
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "model.vision_tower.align_stages.")


@dataclasses.dataclass
class VisionSFTConfig(SFTConfig):
    """`SFTConfig` plus the LLaVA training flags."""

    group_by_modality_length: bool = dataclasses.field(
        default=False,
        metadata={"help": "LLaVA's sampler: batches of one modality (image or text-only), lengths grouped."},
    )
    save_projector: bool = dataclasses.field(
        default=True, metadata={"help": f"write {PROJECTOR_FILE} (projector + multi-path fusion) at the end"}
    )
    save_full_model: bool = dataclasses.field(
        default=True, metadata={"help": "write the whole model (or the LoRA adapter) at the end"}
    )
    loss_curve: bool = dataclasses.field(default=True, metadata={"help": "write loss_curve.png at the end"})
    compile_layers: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "torch.compile each LLM decoder layer (one graph shared by all layers): fuses norms, rotary and "
            "SiLU-mul around the matmuls; measured +8% stage-1 samples/s on an H100 (bench/stage1.py)"
        },
    )


# ---------------------------------------------------------------------------------------------------------------
# LLaVA's modality-grouped sampler


def _split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Splits `indices` into `num_chunks` chunks of equal count and roughly equal total length (LLaVA)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunk_lengths = [0] * num_chunks
    for index in indices:
        shortest = chunk_lengths.index(min(chunk_lengths))
        chunks[shortest].append(index)
        chunk_lengths[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            chunk_lengths[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths, batch_size: int, world_size: int, generator=None) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size] for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [_split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in megabatches for batch in m for i in batch]


def modality_length_grouped_indices(lengths, batch_size: int, world_size: int, generator=None) -> list[int]:
    """LLaVA's `get_modality_length_grouped_indices`: `lengths` > 0 for image samples, < 0 for text-only ones.

    Megabatches (world_size x batch_size) hold one modality; they are shuffled, and the two leftover partial
    megabatches go last, together. Unlike the original (which passes `generator=None` to the inner shuffles and so
    uses the global RNG), every shuffle uses `generator`, so the order is a function of the seed and the epoch.
    """
    zero = [i for i, length in enumerate(lengths) if length == 0]
    if zero:
        raise ValueError(
            f"{len(zero)} sample(s) have modality length 0 (text-only without a word), e.g. dataset index "
            f"{zero[:5]}: LLaVA's sampler needs a non-zero length (positive: image sample, negative: text-only); "
            "drop them (`internvl-chat data check` lists empty turns)"
        )
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices([abs(x) for x in lengths], batch_size, world_size, generator)
    mm = [(i, x) for i, x in enumerate(lengths) if x > 0]
    lang = [(i, -x) for i, x in enumerate(lengths) if x < 0]
    megabatch_size = world_size * batch_size
    groups = []
    for pairs in (mm, lang):
        idx, lens = zip(*pairs)
        order = [idx[i] for i in length_grouped_indices(lens, batch_size, world_size, generator)]
        groups.append([order[i : i + megabatch_size] for i in range(0, len(order), megabatch_size)])
    mm_mega, lang_mega = groups
    additional = mm_mega[-1] + lang_mega[-1]
    megabatches = mm_mega[:-1] + lang_mega[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """Sampler over `modality_lengths` (signed, see above); deterministic in (seed, epoch) for exact resumes."""

    def __init__(self, modality_lengths: list[int], batch_size: int, world_size: int, seed: int = 0):
        self.lengths = list(modality_lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))


def modality_lengths(dataset) -> list[int]:
    """Signed lengths (words of the conversation; > 0 with an image, < 0 text-only), as LLaVA's dataset gives them.

    Uses the dataset's own `modality_lengths` (attribute or column `modality_length`) when it has one, else the
    data layer's rule (`data.formats.modality_length`) on its `messages` / `images` columns.
    """
    own = getattr(dataset, "modality_lengths", None)
    if own is not None:
        return list(own)
    columns = getattr(dataset, "column_names", None) or []
    if "modality_length" in columns:
        return list(dataset["modality_length"])
    image_column = "images" if "images" in columns else "image" if "image" in columns else None
    if "messages" not in columns or image_column is None:
        raise ValueError("group_by_modality_length needs `messages` and `images` columns or `modality_lengths`")
    return [
        modality_length({"messages": messages, "images": images})
        for messages, images in zip(dataset["messages"], dataset[image_column])
    ]


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 artifact


def projector_state_dict(model, full_state: dict | None = None) -> dict[str, torch.Tensor]:
    """The stage-1 trainable weights (projector, multi-path fusion) of a bare or PEFT-wrapped model, our names.

    `full_state`: an already gathered state dict (ZeRO-3 partitions parameters; `accelerator.get_state_dict`
    gathers them), else the model's parameters are read directly.
    """
    from ..keymaps import strip_peft

    items = full_state.items() if full_state is not None else model.named_parameters()
    state = {}
    for name, param in items:
        if ".original_module." in name:
            continue
        clean = strip_peft(name)
        if clean.startswith(PROJECTOR_PREFIXES):
            state[clean] = param.detach().to("cpu").contiguous()
    return state


def save_projector(model, output_dir: str | os.PathLike, full_state: dict | None = None) -> str:
    """Writes `mm_projector.safetensors` (LLaVA's `mm_projector.bin`, as safetensors, transformers-Llava names)."""
    from safetensors.torch import save_file

    path = Path(output_dir) / PROJECTOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    metadata = {
        "format": "pt",
        "projector_type": str(config.projector_type),
        "mm_hidden_size": str(config.vision_config.hidden_size),
        "hidden_size": str(config.text_config.hidden_size),
    }
    save_file(projector_state_dict(model, full_state), str(path), metadata=metadata)
    umask = os.umask(0)  # safetensors >= 0.8 writes 0600 (a private temporary file): give it the usual mode
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return str(path)


def load_projector(model, path: str | os.PathLike) -> list[str]:
    """Loads a stage-1 projector artifact into `model` (LLaVA's `pretrain_mm_mlp_adapter`); returns the keys.

    Accepts our safetensors file (or its folder) and LLaVA's original `mm_projector.bin` (`model.mm_projector.0/2`).
    Shapes must match exactly; every projector weight of the model must be present.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"stage-1 projector artifact {path} not found: run the stage-1 (align) recipe first, or set "
            "model.pretrain_mm_mlp_adapter to its mm_projector.safetensors (LLaVA's mm_projector.bin works too)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        from ..keymaps import llava_projector_key

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {llava_projector_key(k) or k: v for k, v in state.items()}  # unmapped keys are reported below
    own = dict(model.named_parameters())
    missing = [k for k in own if k.startswith("model.multi_modal_projector.") and k not in state]
    unknown = [k for k in state if k not in own]
    if missing or unknown:
        raise ValueError(f"Projector artifact {path} does not fit the model: missing {missing}, unexpected {unknown}")
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
            own[key].copy_(value.to(own[key].dtype))
    logger.info("loaded the stage-1 projector from %s (%d tensors)", path, len(state))
    return sorted(state)


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def lora_target_modules(model) -> str:
    """LLaVA's `find_all_linear_names` rule as a PEFT regex: every nn.Linear of the LLM, never lm_head.

    # [IMPORTANT] LLaVA returned leaf names ("q_proj", "fc1"...), which PEFT matches as suffixes anywhere: with the
    # tower built, CLIP's q_proj / fc1 would get adapters too (LLaVA avoided it only because the tower was created
    # after get_peft_model). An anchored regex on `model.language_model.` keeps the rule exact.
    """
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.model.language_model.named_modules()
            if isinstance(module, nn.Linear)
        }
    )
    if not leaves:
        raise ValueError("No nn.Linear found in the language model for LoRA")
    return r"model\.language_model\..*\.(" + "|".join(map(re.escape, leaves)) + r")"


def lora_config(model, r: int = 128, alpha: int = 256, dropout: float = 0.05, bias: str = "none", **kwargs):
    """peft `LoraConfig` for the LLaVA LoRA recipe; the projector (and fusion) train in full via modules_to_save."""
    from peft import LoraConfig

    modules_to_save = ["multi_modal_projector"]
    if model.config.is_multipath_encoder:
        modules_to_save.append("align_stages")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=lora_target_modules(model),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loss curve


class LossCurveCallback(TrainerCallback):
    """Writes `loss_history.json` and `loss_curve.png` (training loss, eval loss when present) at the end."""

    def __init__(self, title: str = ""):
        self.title = title

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        write_loss_curve(state.log_history, args.output_dir, self.title)


def write_loss_curve(log_history: list[dict], output_dir: str, title: str = "") -> str | None:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, "loss_history.json").write_text(json.dumps({"train": train, "eval": evals}))
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: training nodes have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or Path(output_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = str(Path(output_dir, "loss_curve.png"))
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Trainer


class VisionSFTTrainer(SFTTrainer):
    """SFTTrainer with LLaVA's stage handling; `stage` says what trains and at which learning rates.

    `apply_stage` must have been called on the model (build_model / train.py do it) before PEFT wraps it. The
    training dataset may be a `datasets.Dataset` (messages + images columns) or any map-style torch Dataset, which
    SFTTrainer does not accept: it is passed as its HF view (`data.dataset.hf_view`: an index column whose transform
    returns the torch dataset's items), so items, lazy image decoding and `on_error` stay the torch dataset's.
    Preparation is skipped either way (our collator tokenizes).
    """

    def __init__(self, *args, stage: StageConfig | None = None, train_dataset=None, **kwargs):
        import datasets

        self.stage = stage or StageConfig()
        config = kwargs.get("args")
        if train_dataset is not None and not isinstance(train_dataset, (datasets.Dataset, datasets.IterableDataset)):
            columns = None
            if getattr(config, "group_by_modality_length", False):
                columns = {"modality_length": modality_lengths(train_dataset)}
            train_dataset = hf_view(train_dataset, columns)
        # Metrics of the compact CPU loss (TRL's names, averaged per logging step in `log`), and its token count.
        self.compact_metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self.compact_train_tokens = 0
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if config is not None and getattr(config, "loss_curve", False):
            callbacks.append(LossCurveCallback(title=Path(config.output_dir).name))
        super().__init__(*args, train_dataset=train_dataset, callbacks=callbacks, **kwargs)
        if getattr(self.args, "compile_layers", False):
            backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
            for layer in getattr(backbone, "layers", []):
                layer.compile()

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = parameter_groups(opt_model, self.stage, self.args.learning_rate, self.args.weight_decay, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            for group in groups:
                logger.info(
                    "optimizer group: %d tensors, %s parameters, lr %g, weight decay %g",
                    len(group["params"]),
                    f"{sum(p.numel() for p in group['params']):,}",
                    group["lr"],
                    group["weight_decay"],
                )
        return self.optimizer

    def _compact_loss_applies(self, model, return_outputs: bool) -> bool:
        if return_outputs or self.compute_loss_func is not None or self.label_smoother is not None:
            return False
        if self.args.loss_type != "nll" or self.aux_loss_enabled or self.accelerator.num_processes != 1:
            return False
        return next(model.parameters()).device.type not in ("cuda", "xpu")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss; on CPU the LM head runs only on the supervised positions (same value, ~10x faster).

        # [IMPORTANT] TRL's fused head scores *every* position when Triton is unavailable (CPU), i.e. the full
        # (tokens x vocab) product: with a 32k vocabulary that is >90% of a tiny model's step, while a chat sample
        # supervises a handful of tokens. Same loss, same logged metrics (entropy, mean_token_accuracy,
        # num_tokens); single process only (calling the backbone directly would bypass a DDP wrapper).
        """
        if not self._compact_loss_applies(model, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        kwargs["use_cache"] = False
        # PEFT injects its layers into the module tree in place, so the bare backbone runs the adapters too.
        hidden = base.model(**kwargs).last_hidden_state
        losses, entropy, correct = supervised_cross_entropy(
            base.lm_head, hidden, inputs["labels"], reduction="none", token_stats=True
        )
        n_valid = losses.numel()
        count = n_valid if num_items_in_batch is None else num_items_in_batch
        loss = losses.sum() / torch.as_tensor(count, device=losses.device).clamp(min=1)
        metrics = self.compact_metrics[mode]
        metrics["entropy"].append(entropy.sum().item() / n_valid if n_valid else 0.0)
        metrics["mean_token_accuracy"].append(correct.sum().item() / n_valid if n_valid else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                self.compact_train_tokens += int(inputs["attention_mask"].sum())
            else:
                self.compact_train_tokens += int(inputs["position_ids"].size(1))
        metrics["num_tokens"] = [self.compact_train_tokens]
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the compact loss's metrics (averaged since the last log, `eval_` prefixed in evaluation), as TRL
        does for its own loss, then logs."""
        mode = "train" if self.model.training else "eval"
        metrics = self.compact_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{key}": sum(values) / len(values) for key, values in metrics.items() if values})
        metrics.clear()
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if getattr(self.args, "group_by_modality_length", False) and dataset is not None:
            world = self.args.world_size * self.args.gradient_accumulation_steps
            return ModalityLengthGroupedSampler(
                modality_lengths(dataset), self.args.train_batch_size, world, seed=self.args.seed
            )
        return super()._get_train_sampler(train_dataset)

    def log_trainable(self):
        logger.info("\n%s", trainable_table(self.model, self.stage, self.args.learning_rate))

    def save_stage_artifacts(self, processor=None) -> dict[str, str]:
        """End-of-stage outputs in `output_dir`: model (or adapter), processor, projector artifact, loss curve."""
        out = self.args.output_dir
        written = {}
        if self.args.save_full_model:
            self.save_model(out)
            written["model"] = out
        if processor is not None and self.is_world_process_zero():
            processor.save_pretrained(out)
        if self.args.save_projector:
            full_state = None
            if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                full_state = self.accelerator.get_state_dict(self.deepspeed)  # collective: every rank calls it
            if self.is_world_process_zero():
                unwrapped = self.accelerator.unwrap_model(self.model)
                written["projector"] = save_projector(unwrapped, out, full_state)
        if self.is_world_process_zero():
            losses = [e["loss"] for e in self.state.log_history if "loss" in e]
            if losses and not all(math.isfinite(x) for x in losses):
                logger.warning("non-finite training losses were logged")
        return written
