"""Scoring throughput of `internvl-chat select` on a GPU: samples/s of the conditional-loss scorer, 7B shapes, bf16.

    python bench/select_throughput.py                                   # 7B shapes, bf16, mIFD, 256 samples
    python bench/select_throughput.py --samples 512 --batch-sizes 4,8,16,32 --metric ifd
    python bench/select_throughput.py --tiny --device cpu --samples 8 --batch-sizes 2   # smoke test of the script
    accelerate launch --num_processes 8 bench/select_throughput.py --samples 2048      # multi-GPU (one JSON/rank 0)

A random-weight model with LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336 + Vicuna-7B, 576 image tokens, SDPA) scores
synthetic LLaVA-Instruct-like samples: one image (JPEG of a random size, decoded and padded to square per sample),
a question of ~15 words and an answer of ``--answer-words`` words (default 80, ~110 tokens; LLaVA-Instruct-150k's
detailed answers are longer, VQA short answers much shorter). mIFD needs three forwards per sample (s(A),
s(A|Q), s(A|I,Q)); the two text-only ones are short, the image one carries 576 image tokens. samples/s counts wall
time from the sample list to the scores (image decoding and tokenization included), through the same
`ConditionalLossScorer.score` that the CLI runs, per batch size; the best is reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "vicuna-v1.5"
WORDS = (
    "the a man woman dog cat red blue green sign street car bus table kitchen window sky tree building person "
    "holding standing sitting near next to in on of with large small white black wooden metal two three several"
).split()


def make_samples(folder: Path, n: int, answer_words: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=85)
        question = " ".join(rng.choice(WORDS, 15)) + "?"
        answer = " ".join(rng.choice(WORDS, answer_words)).capitalize() + "."
        samples.append(
            {
                "id": str(i),
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [str(path)],
                "source": "bench",
            }
        )
    return samples


def build(tiny: bool, device: str, dtype: torch.dtype):
    from internvl_chat.factories import build_processor, create, prepare_tokenizer

    if tiny:
        model, processor, _ = create("llava-v1.5-7b", None, tokenizer=str(TOKENIZER), tiny=True)
        return model.to(device).eval(), processor
    from common import build_pair

    tokenizer, _ = prepare_tokenizer(str(TOKENIZER), 2048)
    model, _ = build_pair(dtype=dtype, device=device, native=False)  # SDPA: transformers' default
    processor = build_processor("llava-v1.5-7b", tokenizer, model.config.image_seq_length, tiny=False)
    return model.eval(), processor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--metric", default="mifd", choices=["ifd", "vfd", "mifd", "ffd"])
    parser.add_argument("--answer-words", type=int, default=80)
    parser.add_argument("--padding-side", default="right", choices=["right", "left"])
    parser.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--device", default=None, help="default: this process's accelerate device")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from internvl_chat.data.scoring import METRICS, ConditionalLossScorer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = args.device or str(accelerator.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, processor = build(args.tiny, device, dtype)
    spec = METRICS[args.metric]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(Path(tmp), args.samples, args.answer_words)
        if args.metric == "ffd":  # duo-conversations: append a second QA pair
            for s in samples:
                s["messages"] += [s["messages"][0] | {"content": "Why?"}, s["messages"][1]]
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            scorer = ConditionalLossScorer(
                model,
                processor,
                template="vicuna_v1",
                batch_size=batch_size,
                padding_side=args.padding_side,
                accelerator=accelerator,
                show_progress=False,
            )
            # warm-up on one chunk (kernels, allocator), then the timed run
            scorer.score(samples[: scorer.chunk_size], args.metric)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            records = scorer.score(samples, args.metric)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            ok = sum(1 for r in records.values() if r["status"] == "ok")
            results.append(
                {
                    "batch_size": batch_size,
                    "seconds": round(seconds, 3),
                    "samples_per_s": round(len(samples) / seconds, 2),
                    "sequences_per_unit": len(spec.losses),
                    "scored_ok": ok,
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if device.startswith("cuda")
                    else None,
                }
            )
    if not accelerator.is_main_process:
        return 0
    try:
        from common import environment

        env = environment()
    except Exception:  # noqa: BLE001 - the environment record is best effort
        env = {"torch": torch.__version__}
    best = max(results, key=lambda r: r["samples_per_s"])
    payload = {
        "bench": "select_throughput",
        "model": "tiny" if args.tiny else "llava-v1.5-7b shapes (random weights)",
        "dtype": str(dtype).replace("torch.", ""),
        "metric": args.metric,
        "losses": list(spec.losses),
        "samples": args.samples,
        "answer_words": args.answer_words,
        "processes": accelerator.num_processes,
        # all processes together: score() splits the samples over them and returns when all are done
        "samples_per_s": best["samples_per_s"],
        "best_batch_size": best["batch_size"],
        "runs": results,
        "environment": env,
    }
    text = json.dumps(payload, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
