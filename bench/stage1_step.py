"""GPU timing of a real-shape (7B) stage-1 (align) step through the tiny recipes' code path; prints one JSON line.

    python bench/stage1_step.py                                   # llava-v1.5-7b, batch 16, 12 steps (3 warm-up)
    python bench/stage1_step.py --preset llava-v1.5-13b --batch-size 8 --steps 8
    python bench/stage1_step.py --preset llavar2-llama3.1-8b --tokenizer tests/fixtures/tokenizers/llama-3.1
    python bench/stage1_step.py --tiny --steps 4 --batch-size 4 --workers 0   # CPU smoke test of the script

Same pieces as `internvl-chat train recipes/llava-v1.5-7b-align.yaml`: `create` (config, processor with the real
tokenizer), `apply_stage(align)`, `VisionChatCollator` (`plain` template) over a `VisionChatDataset` read from LLaVA
JSON with lazily loaded image files, `VisionSFTTrainer` (TRL SFTTrainer: bf16, tf32, gradient checkpointing, our
optimizer groups). Only the weights differ: random, built on the meta device (seconds) and materialised directly
on the GPU in bf16, so no checkpoint download is needed. Synthetic data: random RGB images, ~30-word captions.

Output: {"preset", "gpu", "batch_size", "seq_len", "step_s" (median of the timed steps), "samples_per_s",
"tokens_per_s", "peak_memory_gib", "trainable", "total", "loss_first", "loss_last", ...}.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from internvl_chat.data import VisionChatDataset  # noqa: E402
from internvl_chat.factories import create  # noqa: E402
from internvl_chat.training.collator import VisionChatCollator  # noqa: E402
from internvl_chat.training.stages import StageConfig, apply_stage  # noqa: E402
from internvl_chat.training.trainer import VisionSFTConfig, VisionSFTTrainer  # noqa: E402

WORDS = "a photo of the red cat sitting on wooden table near window with green plant and small blue cup".split()


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def synthetic_data(folder, n, size, rng):
    records = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        caption = " ".join(rng.choice(WORDS, size=30))
        conversations = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": conversations})
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-v1.5-7b")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "tests/fixtures/tokenizers/vicuna-v1.5"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--compile-layers", action="store_true", help="torch.compile each LLM decoder layer")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="smoke test of the script (tiny model, CPU allowed)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("needs a CUDA device (or --tiny for a CPU smoke test)")

    torch.manual_seed(0)
    t0 = time.time()
    if args.tiny:
        model, processor, counts = create(args.preset, None, tokenizer=args.tokenizer, tiny=True)
        model = model.to("cuda" if cuda else "cpu")
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # the meta skeleton and its materialised weights are bf16 directly
        try:
            model, processor, counts = create(args.preset, None, tokenizer=args.tokenizer, weights=False)
        finally:
            torch.set_default_dtype(previous)
        model = model.to_empty(device="cuda")
        with torch.no_grad():
            model.init_weights()
    materialise_s = time.time() - t0
    processor.image_processor.image_aspect_ratio = "square"
    stage = StageConfig(stage="align")
    parts = apply_stage(model, stage)

    size = processor.image_processor.crop_size["height"]
    with tempfile.TemporaryDirectory() as tmp:
        n = args.batch_size * (args.steps + 1)
        data = synthetic_data(tmp, n, size, np.random.default_rng(0))
        dataset = VisionChatDataset.from_file(data, image_folder=tmp)
        collator = VisionChatCollator(processor, template="plain", max_length=2048, over_length="truncate")
        seq_len = len(collator.encode(dataset.samples[0])["input_ids"])
        config = VisionSFTConfig(
            output_dir=os.path.join(tmp, "out"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            weight_decay=0.0,
            bf16=cuda,
            tf32=cuda,
            use_cpu=not cuda,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            compile_layers=args.compile_layers,
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
            callbacks=[timer],
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    timed = timer.times[args.warmup :] or timer.times
    step = statistics.median(timed)
    result = {
        "preset": args.preset,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "image_tokens": model.config.image_seq_length,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "compile_layers": args.compile_layers,
        "steps_timed": len(timed),
        "step_s": round(step, 4),
        "step_s_min": round(min(timed), 4),
        "samples_per_s": round(args.batch_size / step, 2),
        "tokens_per_s": round(args.batch_size * seq_len / step, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "materialise_s": round(materialise_s, 1),
        "trainable": sum(t for t, _ in parts.values()),
        "total": counts["total"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
