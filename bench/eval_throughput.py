"""Evaluation throughput on a GPU: questions/s of `internvl-chat eval`'s runner vs a LLaVA-style batch-1 loop.

    python bench/eval_throughput.py                                  # 7B shapes, fp16, 256 questions
    python bench/eval_throughput.py --questions 512 --batch-sizes 1,8,16,32,64 --max-new-tokens 6
    python bench/eval_throughput.py --batch-sizes 64 --max-new-tokens 6 --fast-decode   # ours both ways
    python bench/eval_throughput.py --tiny --device cpu --questions 16  # smoke test of the script itself

Both sides run a random-weight model with LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336 + Vicuna-7B, 576 image tokens,
fp16, SDPA) on the same short-answer task: VQAv2-style questions + "Answer the question using a single word or
phrase.", images of varied sizes stored as JPEG files (decoded and padded to square per question, as LLaVA does).

* ours: `internvl_chat.eval.runner.generate_predictions` (length-sorted left-padded batches, images decoded in a
  thread pool, one task per image, while the GPU generates) at every batch size of ``--batch-sizes``; the best is
  reported. With ``--fast-decode`` also through `FastGreedyDecoder` (``fast_decode=True``): ``ours_fast_decode``,
  after a warm-up at each batch size (compiling the decode step and recording its CUDA graphs is not timed), with
  ``fast_decode_same_answers`` (share of answers equal to the ``model.generate`` run at the same batch size: fp16
  near-ties can flip a token).
* ``breakdown``: per run, the runner's timing split (seconds): waiting for prepared inputs (``first_wait`` of it
  for the first batch), host→device copies, prefill + generation (GPU-synchronised), detokenize + write, the whole
  loop, and image decoding + preprocessing + tokenization summed over the worker threads.
* baseline: transformers-native `LlavaForConditionalGeneration` with the same shapes, driven like LLaVA's
  ``model_vqa_loader.py``: one question at a time (open image, processor, generate, decode).

FLOP accounting (`flops_per_question`): ``model_tflop_per_question`` (prefill of the mean prompt + the decode steps +
the vision tower), ``questions_per_second_at_peak`` (the ceiling at the GPU's peak bf16/fp16 FLOP/s) and the ``mfu``
of the best runs, i.e. how much of the GPU the whole loop (preprocessing overlap included) turns into model work.

Random weights never emit EOS, so every answer is exactly ``--max-new-tokens`` tokens (default 6, about a real
short answer plus EOS); questions/s counts wall time including image decoding. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
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

TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "vicuna-v1.5"
QUESTIONS = ["What color is the bus?", "How many people are there?", "Is this a kitchen?", "What is on the table?",
             "What sport is being played?", "Where is the cat sitting?", "What is the man holding in his hand?",
             "Is it raining?"]  # fmt: skip


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        h, w = int(rng.integers(240, 640)), int(rng.integers(240, 640))
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    return names


def build_ours(tiny: bool, device: str, dtype: torch.dtype):
    from internvl_chat.factories import build_processor, prepare_tokenizer
    from internvl_chat.modeling import InternVLChatForConditionalGeneration
    from internvl_chat.presets import build_config, get_preset
    from internvl_chat.templates import TEMPLATES

    preset = "llava-v1.5-7b"
    tok, vocab = prepare_tokenizer(str(TOKENIZER), get_preset(preset).model_max_length)
    config = build_config(
        preset,
        vocab_size=vocab,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tiny=tiny,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.pad_token_id = tok.pad_token_id
    with torch.device("meta"):
        model = InternVLChatForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype)
    model.init_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(s) for s in TEMPLATES["vicuna_v1"].stop_strings]
    processor = build_processor(preset, tok, config.image_seq_length, tiny)
    return model.eval(), processor, config


def build_llava(our_config, tokenizer, device: str, dtype: torch.dtype):
    """transformers' Llava with the same vision / text shapes (CLIP keeps CLS in the hidden states; "default" drops
    it, like LLaVA's "patch")."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    vision = our_config.vision_config.to_dict()
    text = our_config.text_config.to_dict()
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=our_config.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=our_config.image_seq_length)  # fmt: skip
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype)
    model.init_weights()
    size = vision["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    return model.eval(), processor


def llava_loop(model, processor, prompts, image_paths, max_new_tokens: int, device: str, dtype) -> float:
    """LLaVA's model_vqa_loader.py, one question at a time; returns seconds."""
    start = time.perf_counter()
    for prompt, path in zip(prompts, image_paths):
        image = Image.open(path).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
        processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def flops_per_question(model, config, prompt_tokens: float, new_tokens: int) -> float:
    """Model FLOPs of one short-answer question: 2 x weights x tokens for the language model's linear layers (prefill
    of the whole prompt + one token per decode step), causal attention 2 x layers x T^2 x hidden, the vision tower
    over its patches + CLS, and the projector. Where a run's time goes is then its achieved FLOP/s against the peak."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings().weight.numel()
    lm_linear = sum(p.numel() for p in lm.parameters()) - embed + model.lm_head.weight.numel()
    text = config.text_config
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    patches = config.image_seq_length + 1
    t = prompt_tokens
    prefill = 2 * lm_linear * t + 2 * text.num_hidden_layers * t * t * text.hidden_size
    decode = 2 * lm_linear * (new_tokens - 1)
    return prefill + decode + 2 * tower * patches + 2 * projector * config.image_seq_length


def best_of(runs: dict) -> dict | None:
    """The fastest of {"batch_N": questions/s or "OOM"}: {"batch_size", "questions_per_second"} (None if all OOM)."""
    numeric = {k: v for k, v in runs.items() if isinstance(v, float)}
    if not numeric:
        return None
    best = max(numeric, key=numeric.get)
    return {"batch_size": int(best.split("_")[1]), "questions_per_second": numeric[best]}


def run_ours(model, processor, samples, out: Path, bs: int, args, fast_decode: bool = False):
    """One timed `generate_predictions` run: (questions/s of wall time or "OOM", the runner's timing breakdown)."""
    from internvl_chat.eval.runner import TIMING_KEYS, generate_predictions

    start = time.perf_counter()
    try:
        _, stats = generate_predictions(model, processor, samples, out, batch_size=bs,
                                        max_new_tokens=args.max_new_tokens, num_workers=args.num_workers,
                                        desc=f"bs{bs}" + (" fast" if fast_decode else ""),
                                        fast_decode=fast_decode)  # fmt: skip
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", None
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    qps = round(args.questions / (time.perf_counter() - start), 2)
    breakdown = {key.removesuffix("_seconds"): round(stats[key], 3) for key in TIMING_KEYS}
    breakdown["fast_decode"] = stats["fast_decode"]
    return qps, breakdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--fast-decode", action="store_true", help="also run ours with fast_decode=True")
    parser.add_argument("--profile", action="store_true", help="profile one fast-decode batch (GPU time by kernel)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dtype = getattr(torch, args.dtype) if args.device != "cpu" else torch.float32
    torch.manual_seed(0)

    from internvl_chat.eval.runner import build_prompt, generate_predictions
    from internvl_chat.eval.tasks import SHORT_ANSWER, Sample

    model, processor, config = build_ours(args.tiny, args.device, dtype)
    from common import environment, peak_flops

    result = {"env": environment(), "command": "python3 bench/eval_throughput.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "shapes": "llava-v1.5-7b" + (" (tiny)" if args.tiny else ""), "dtype": str(dtype),
              "questions": args.questions, "max_new_tokens": args.max_new_tokens,
              "parameters": sum(p.numel() for p in model.parameters()), "ours": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_images(folder, args.questions)
        samples = [Sample(i, f"{QUESTIONS[i % len(QUESTIONS)]}\n{SHORT_ANSWER}", str(folder / n))
                   for i, n in enumerate(names)]  # fmt: skip
        # Warm-up (CUDA kernels, allocator) on a few questions.
        generate_predictions(model, processor, samples[:4], folder / "warm.jsonl", batch_size=4,
                             max_new_tokens=args.max_new_tokens, num_workers=args.num_workers)  # fmt: skip
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        result["breakdown"] = {"ours": {}}
        for bs in batch_sizes:
            qps, breakdown = run_ours(model, processor, samples, folder / f"ours_{bs}.jsonl", bs, args)
            result["ours"][f"batch_{bs}"] = qps
            result["breakdown"]["ours"][f"batch_{bs}"] = breakdown
        result["ours_best"] = best_of(result["ours"])
        prompts = [build_prompt(processor, s) for s in samples]  # + the image's placeholder tokens, expanded
        text_tokens = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
        tokens = sum(text_tokens) / len(prompts) + config.image_seq_length - 1
        flops = flops_per_question(model, config, tokens, args.max_new_tokens)
        peak = peak_flops()
        result["mean_prompt_tokens"] = round(tokens, 1)
        result["model_tflop_per_question"] = round(flops / 1e12, 3)
        result["questions_per_second_at_peak"] = round(peak / flops, 1)  # the ceiling at 100 % of peak FLOP/s
        if result["ours_best"]:
            result["ours_best"]["mfu"] = round(result["ours_best"]["questions_per_second"] * flops / peak, 3)

        if args.fast_decode:
            result["ours_fast_decode"], result["breakdown"]["ours_fast_decode"] = {}, {}
            result["fast_decode_same_answers"] = {}
            for bs in batch_sizes:
                # One warm-up per batch size on the longest prompts (the same decoder length, so the runner reuses
                # the warmed decoder; a short last batch is filled up to the batch size, so one shape).
                # A fresh dynamo cache each time: every batch size builds its own decoder, and the compiled step's
                # entries would otherwise pile up to the recompile limit (then it silently runs eager).
                torch._dynamo.reset()
                n_warm = min(args.questions, bs * -(-len(QUESTIONS) // bs))
                try:
                    generate_predictions(model, processor, samples[:n_warm], folder / f"warm_fast_{bs}.jsonl",
                                         batch_size=bs, max_new_tokens=args.max_new_tokens,
                                         num_workers=args.num_workers, fast_decode=True)  # fmt: skip
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                out = folder / f"fast_{bs}.jsonl"
                qps, breakdown = run_ours(model, processor, samples, out, bs, args, fast_decode=True)
                result["ours_fast_decode"][f"batch_{bs}"] = qps
                result["breakdown"]["ours_fast_decode"][f"batch_{bs}"] = breakdown
                if isinstance(qps, float) and isinstance(result["ours"].get(f"batch_{bs}"), float):
                    plain = [json.loads(x)["text"] for x in (folder / f"ours_{bs}.jsonl").read_text().splitlines()]
                    fast = [json.loads(x)["text"] for x in out.read_text().splitlines()]
                    same = sum(x == y for x, y in zip(plain, fast)) / len(plain)
                    result["fast_decode_same_answers"][f"batch_{bs}"] = round(same, 4)
            if args.profile:  # one batch of the last batch size: prefill (vision + LLM) + the decode steps
                from common import profile_top

                one = dict(batch_size=bs, max_new_tokens=args.max_new_tokens, num_workers=args.num_workers)
                runs = iter(range(2))  # a fresh output file per call: the runner resumes from an existing one

                def batch():
                    out = folder / f"profile_{next(runs)}.jsonl"
                    generate_predictions(model, processor, samples[:bs], out, **one, fast_decode=True)

                result["profile_fast_batch"] = profile_top(batch, rows=20)
            best_fast = best_of(result["ours_fast_decode"])
            if best_fast:
                best_fast["mfu"] = round(best_fast["questions_per_second"] * flops / peak, 3)
                result["ours_fast_decode_best"] = best_fast
                result["speedup_fast_decode_vs_generate"] = round(
                    best_fast["questions_per_second"] / result["ours_best"]["questions_per_second"], 2
                )

        if not args.skip_baseline:
            del model
            # The runner keeps a fast decoder on the model (a reference cycle) and dynamo holds compiled graphs:
            # free both before the baseline model is built beside it.
            torch._dynamo.reset()
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            llava, llava_proc = build_llava(config, processor.tokenizer, args.device, dtype)
            llava_loop(
                llava, llava_proc, prompts[:4], [s.image for s in samples[:4]], args.max_new_tokens, args.device, dtype
            )  # fmt: skip  (warm-up)
            seconds = llava_loop(llava, llava_proc, prompts, [s.image for s in samples], args.max_new_tokens,
                                 args.device, dtype)  # fmt: skip
            result["transformers_llava_batch1"] = round(args.questions / seconds, 2)
            baseline = result["transformers_llava_batch1"]
            result["speedup_best_vs_llava_batch1"] = round(result["ours_best"]["questions_per_second"] / baseline, 2)
            if isinstance(result["ours"].get("batch_1"), float):
                result["speedup_ours_batch1_vs_llava_batch1"] = round(result["ours"]["batch_1"] / baseline, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
