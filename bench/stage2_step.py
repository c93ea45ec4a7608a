"""FULL training step (forward + backward + AdamW) through the trainers users run, stage 2 on mix665k-shaped data
(default) or stage 1 on LCS-558K-shaped captions (``--stage align``): our recipe path (VisionSFTTrainer, our
collator) vs the peer's best effort (TRL `SFTTrainer` + transformers-native `LlavaForConditionalGeneration`, TRL's own
vision collator), same shapes (LLaVA-1.5-7B), same conversations and images.

    PYTHONPATH=src python3 bench/stage2_step.py --out bench/results/stage2_step.json            # every variant
    PYTHONPATH=src python3 bench/stage2_step.py --variants ours_fast,native_liger_compile --steps 10
    PYTHONPATH=src python3 bench/stage2_step.py --tiny --steps 3 --variants ours_fast,native_plain   # CPU smoke test
    PYTHONPATH=src python3 bench/stage2_step.py --stage align --batch-size 16 --variants ours_fast,native_liger_compile

Variants (each runs in its own subprocess, so one's memory never limits the next):
- ``ours_fast``: the recipe's fast settings: padding-free packed rows + ``internvl_varlen`` attention, no gradient
  checkpointing, every decoder layer compiled (``compile_layers``), fused AdamW (``optim: adamw_torch_fused``).
- ``ours_fast_unfused``: the same with the default (foreach) AdamW, to show the optimizer's share.
- ``native_liger_compile``: TRL + native Llava, right-padded batches, no checkpointing, ``use_liger_kernel=True``
  (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), each decoder layer ``torch.compile``'d, fused AdamW.
- ``native_liger``: the same without compile (liger's Triton kernels alone); ``native_plain``: TRL defaults with
  fused AdamW (no liger, no compile).
A variant that runs out of memory is recorded with its error (and ``--ckpt-fallback`` retries it with gradient
checkpointing, flagged in the result).

Length mix (seeded): 70 % single-turn image samples (~30-150 answer words), 22 % multi-turn image samples
(~200-900 words), 8 % text-only (~100-800 words). Reported: median step time over the timed steps, samples/s, real
(non-pad) tokens/s, and MFU on real tokens: 6 · N_llm · T (LLM + projector trained) + 2 · N_vision · T_image (frozen
tower forward), over the bf16 dense peak. Stage 1 (``--stage align``: projector trained, LLM and tower frozen, the
``plain`` template, one ~10-40-word caption per image): MFU counts 4 · N_llm · T (the frozen LLM's forward plus
its input-gradient backward) + 2 · N_vision · T_image.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from common import environment, peak_flops  # noqa: E402

VARIANTS = ["ours_fast", "ours_fast_unfused", "native_liger_compile", "native_liger", "native_plain"]
WORDS = (
    "the a of image shows red blue green cat dog person table window street car sign text number left right top "
    "bottom small large near behind holding wearing sitting standing two three what where which color"
).split()


def conversations(n: int, seed: int = 0, stage: str = "finetune") -> list[dict]:
    """LLaVA-JSON records shaped like mix665k (or LCS-558K captions for ``align``); images named `{i}.jpg`."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    records = []
    for i in range(n):
        if stage == "align":
            conv = [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": words(rng.randint(10, 40)) + "."},
            ]
            records.append({"id": str(i), "conversations": conv, "image": f"{i}.jpg"})
            continue
        r = rng.random()
        if r < 0.70:
            image, turns = True, [(rng.randint(5, 15), rng.randint(25, 120))]
        elif r < 0.92:
            image, total = True, rng.randint(160, 700)
            k = rng.randint(2, 5)
            turns = [(rng.randint(5, 15), max(5, total // k)) for _ in range(k)]
        else:
            image, total = False, rng.randint(80, 600)
            turns = [(rng.randint(10, 30), total)]
        conv = []
        for t, (q, a) in enumerate(turns):
            question = words(q) + "?"
            if t == 0 and image:
                question = "<image>\n" + question
            conv += [{"from": "human", "value": question}, {"from": "gpt", "value": words(a) + "."}]
        record = {"id": str(i), "conversations": conv}
        if image:
            record["image"] = f"{i}.jpg"
        records.append(record)
    return records


def write_images(folder: str, records: list[dict], size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for record in records:
        if "image" in record:
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, record["image"]), quality=90)


def to_messages(record: dict, folder: str) -> dict:
    """The same conversation in TRL's conversational vision format (messages + images columns)."""
    from PIL import Image

    messages = []
    for turn in record["conversations"]:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        content = []
        if text.startswith("<image>\n"):
            content.append({"type": "image"})
            text = text[len("<image>\n") :]
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    images = [Image.open(os.path.join(folder, record["image"])).convert("RGB")] if "image" in record else []
    return {"messages": messages, "images": images}


class StepTimer:
    """TrainerCallback timing each optimizer step (CUDA-synchronised) and counting real tokens per step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer.start)

        self.times, self.start, self.callback = [], None, _Callback()


def real_tokens(collator, rows) -> tuple[int, int]:
    """(real, non-pad tokens; images) over all rows, each collated alone as the trainer's collator builds it."""
    real = images = 0
    for row in rows:
        batch = collator([row])
        mask = batch.get("attention_mask")
        real += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        images += 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
    return real, images


def materialise(build, cuda: bool, tiny: bool):
    """Builds a model with random weights directly in bf16 on the GPU (fp32 on CPU for --tiny)."""
    if tiny:
        model = build()
        return model.to("cuda" if cuda else "cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return build()
    finally:
        torch.set_default_dtype(previous)


def run_ours(args, variant: str, folder: str, records: list[dict]):
    from internvl_chat.data import VisionChatDataset
    from internvl_chat.factories import create
    from internvl_chat.training.collator import VisionChatCollator
    from internvl_chat.training.stages import StageConfig, apply_stage
    from internvl_chat.training.trainer import VisionSFTConfig, VisionSFTTrainer

    cuda = torch.cuda.is_available()
    holder = {}

    def build():
        model, processor, _ = create(args.preset, None, tokenizer=args.tokenizer, tiny=args.tiny, weights=args.tiny)
        holder["processor"] = processor
        if not args.tiny:
            # create(weights=False) leaves meta tensors: rebuild the same config on the current (CUDA) device.
            from internvl_chat.modeling import InternVLChatForConditionalGeneration

            model = InternVLChatForConditionalGeneration(model.config)
        return model

    torch.manual_seed(0)
    model = materialise(build, cuda, args.tiny)
    processor = holder["processor"]
    model.set_attn_implementation("internvl_varlen")
    stage = StageConfig(stage=args.stage)
    apply_stage(model, stage)
    dataset = VisionChatDataset.from_file(os.path.join(folder, "data.json"), image_folder=folder)
    collator = VisionChatCollator(
        processor, template=template(args), max_length=2048, over_length="truncate", packing=True
    )
    config = VisionSFTConfig(
        output_dir=os.path.join(folder, "out-ours"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5,
        weight_decay=0.0,
        bf16=cuda,
        tf32=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=args.ckpt,
        compile_layers=cuda,
        optim="adamw_torch_fused" if variant == "ours_fast" and cuda else "adamw_torch",
        dataloader_num_workers=args.workers,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        save_full_model=False,
        save_projector=False,
        loss_curve=False,
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = VisionSFTTrainer(
        model=model,
        args=config,
        stage=stage,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[timer.callback],
    )
    return model, trainer, timer, collator, [dataset[i] for i in range(len(dataset))]


def template(args) -> str:
    return "plain" if args.stage == "align" else "vicuna_v1"


def native_processor(args, tokenizer_dir: str, size: int):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from internvl_chat.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=get_template(template(args)),
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def run_native(args, variant: str, folder: str, records: list[dict]):
    import datasets
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from internvl_chat.presets import build_config

    cuda = torch.cuda.is_available()
    ours_config = build_config(args.preset, vocab_size=32064, image_token_id=32000, tiny=args.tiny)
    size = ours_config.vision_config.image_size
    processor = native_processor(args, args.tokenizer, size)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**ours_config.vision_config.to_diff_dict()),
        text_config=LlamaConfig(**ours_config.text_config.to_diff_dict()),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = materialise(lambda: LlavaForConditionalGeneration(config), cuda, args.tiny)
    model.config.use_cache = False
    # Stage 2: the vision tower is frozen; LLM and projector train (LLaVA's finetune stage). Stage 1: projector only.
    for name, param in model.named_parameters():
        if args.stage == "align":
            param.requires_grad = "multi_modal_projector" in name
        else:
            param.requires_grad = "vision_tower" not in name
    rows = [to_messages(r, folder) for r in records]
    dataset = datasets.Dataset.from_list(rows)
    liger = variant in ("native_liger_compile", "native_liger") and cuda
    sft = SFTConfig(
        output_dir=os.path.join(folder, "out-native"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5,
        weight_decay=0.0,
        bf16=cuda,
        tf32=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=args.ckpt,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        use_liger_kernel=liger,
        dataloader_num_workers=args.workers,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=None,
        disable_tqdm=True,
    )
    collator = DataCollatorForVisionLanguageModeling(processor, max_length=None)
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[timer.callback],
    )
    if variant == "native_liger_compile" and cuda:
        for layer in trainer.model.model.language_model.layers:
            layer.compile()
    return model, trainer, timer, collator, rows


def run_variant(args, variant: str) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("needs a CUDA device (or --tiny for a CPU smoke test)")
    from internvl_chat.presets import build_config

    size = build_config(args.preset, vocab_size=32064, image_token_id=32000, tiny=args.tiny).vision_config.image_size
    n = args.batch_size * args.steps
    records = conversations(n, seed=args.seed, stage=args.stage)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "data.json"), "w") as f:
            json.dump(records, f)
        write_images(folder, records, size)
        runner = run_ours if variant.startswith("ours") else run_native
        model, trainer, timer, collator, rows = runner(args, variant, folder, records)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        total_real, total_images = real_tokens(collator, rows)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    timed = timer.times[args.warmup :] or timer.times
    step = statistics.median(timed)
    # One epoch over n = batch x steps records: the mean step holds 1/steps of all real tokens and images.
    real, images = total_real / args.steps, total_images / args.steps
    vision = model.model.vision_tower if hasattr(model.model, "vision_tower") else None
    n_vision = sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    image_tokens = 577  # CLIP-L/336 tokens per image through the tower (576 patches + cls)
    if args.stage == "align":
        n_llm = sum(p.numel() for p in model.parameters()) - n_vision
        flops = 4 * n_llm * real + 2 * n_vision * images * image_tokens
    else:
        flops = 6 * n_trained * real + 2 * n_vision * images * image_tokens
    return {
        "variant": variant,
        "stage": args.stage,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.ckpt,
        "steps_timed": len(timed),
        "step_s": round(step, 4),
        "step_s_all": [round(t, 4) for t in timer.times],
        "samples_per_s": round(args.batch_size / step, 2),
        "real_tokens_per_step": round(real, 1),
        "real_tokens_per_s": round(real / step, 1),
        "mfu_real_tokens": round(flops / step / peak_flops(), 4) if cuda else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "trained_parameters": n_trained,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--stage", choices=["finetune", "align"], default="finetune")
    parser.add_argument("--preset", default="llava-v1.5-7b")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "tests/fixtures/tokenizers/vicuna-v1.5"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing (compile)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing on (default off)")
    parser.add_argument("--ckpt-fallback", action="store_true", help="retry an out-of-memory variant with --ckpt")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test of the script (tiny model)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args, args.one)), flush=True)
        return 0
    results = []
    for variant in args.variants.split(","):
        tries = [False] + ([True] if args.ckpt_fallback and not args.ckpt else [])
        for ckpt in tries:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", variant] + [
                a for a in (argv if argv is not None else sys.argv[1:])
            ]
            if ckpt:
                cmd.append("--ckpt")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][7:]))
                break
            error = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            results.append({"variant": variant, "gradient_checkpointing": ckpt or args.ckpt, "error": error[-500:]})
            sys.stderr.write(proc.stderr[-3000:])
        print(json.dumps(results[-1]), flush=True)
    best = {}
    for r in results:
        if "samples_per_s" in r:
            side = "ours" if r["variant"].startswith("ours") else "native"
            if r["samples_per_s"] > best.get(side, {}).get("samples_per_s", 0):
                best[side] = r
    summary = {
        "env": environment(),
        "command": "python3 bench/stage2_step.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    if "ours" in best and "native" in best:
        summary["ratio_best_vs_best"] = round(best["ours"]["samples_per_s"] / best["native"]["samples_per_s"], 3)
        summary["best"] = {k: v["variant"] for k, v in best.items()}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
