"""Stage-2 (LLM + projector trained) forward + backward on a realistic length mix: ours (padding-free packed rows,
loss on supervised positions only) vs transformers-native Llava (right-padded batches), same process, same weights.

    PYTHONPATH=src python3 bench/stage2.py --batches 10 --batch-size 4 --out bench/results/stage2.json

Length mix shaped like LLaVA's mix665k (seeded): 70% single-turn image samples (576 image + 30-150 text tokens),
22% multi-turn image samples (576 + 200-900 text tokens), 8% text-only (100-800 tokens); about half of the text
tokens are supervised. Gradient checkpointing on for both; fwd + bwd only (no optimizer: full 7B AdamW states do not
fit one GPU next to two models). Reports samples/s, real (non-pad) tokens/s and MFU on real tokens
(6·N·T for the trained LLM + the vision forward, over the bf16 peak).
"""

import argparse
import random
import sys

import torch
from common import build_pair, environment, peak_flops, timed, write

IMAGE_TOKEN, IMAGE_TOKENS = 32000, 576


def sample_mix(n, seed=0):
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        r = rng.random()
        if r < 0.70:
            image, text = True, rng.randint(30, 150)
        elif r < 0.92:
            image, text = True, rng.randint(200, 900)
        else:
            image, text = False, rng.randint(100, 800)
        ids = [1] + ([IMAGE_TOKEN] * IMAGE_TOKENS if image else []) + [rng.randint(100, 30000) for _ in range(text)]
        labels = [-100] * (len(ids) - text // 2) + ids[len(ids) - text // 2 :]
        samples.append((torch.tensor(ids), torch.tensor(labels), image))
    return samples


def padded_batch(samples, device="cuda"):
    width = max(len(ids) for ids, _, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, (i, lab, _) in enumerate(samples):
        ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
    n_images = sum(image for _, _, image in samples)
    return ids.to(device), mask.to(device), labels.to(device), n_images


def packed_batch(samples, device="cuda"):
    ids = torch.cat([i for i, _, _ in samples])[None]
    # The first label of each sample must not be predicted from the previous sample's last token.
    labels = torch.cat([torch.cat([torch.tensor([-100]), lab[1:]]) for _, lab, _ in samples])[None]
    positions = torch.cat([torch.arange(len(i)) for i, _, _ in samples])[None]
    n_images = sum(image for _, _, image in samples)
    return ids.to(device), positions.to(device), labels.to(device), n_images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="bench/results/stage2.json")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True

    ours, llava = build_pair()
    samples = sample_mix(args.batches * args.batch_size)
    groups = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    real_tokens = sum(len(i) for i, _, _ in samples)
    images = sum(image for _, _, image in samples)
    llm = sum(p.numel() for p in ours.model.language_model.parameters()) + ours.lm_head.weight.numel()
    llm -= ours.model.language_model.get_input_embeddings().weight.numel()
    vision = sum(p.numel() for p in ours.model.vision_tower.parameters())
    flops = 6 * llm * real_tokens + 2 * vision * 577 * images
    pixels = torch.randn(args.batch_size, 3, 336, 336, device="cuda", dtype=torch.bfloat16)

    def run(model, packed):
        def epoch():
            for group in groups:
                if packed:
                    ids, positions, labels, n = packed_batch(group)
                    out = model(
                        input_ids=ids,
                        position_ids=positions,
                        labels=labels,
                        pixel_values=pixels[:n],
                        use_cache=False,
                        skip_logits=True,
                    )
                else:
                    ids, mask, labels, n = padded_batch(group)
                    out = model(
                        input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels[:n], use_cache=False
                    )
                out.loss.backward()
                model.zero_grad(set_to_none=True)

        return epoch

    rows = {}
    padded_tokens = sum(max(len(i) for i, _, _ in g) * len(g) for g in groups)
    for name, model, packed in (("native_padded", llava, False), ("ours_packed", ours, True)):
        model.to("cuda")
        model.requires_grad_(True)
        model.model.vision_tower.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(run(model, packed), warmup=1, repeat=2)
        rows[name] = {
            "samples_per_s": round(len(samples) / seconds, 2),
            "real_tokens_per_s": round(real_tokens / seconds),
            "mfu_real_tokens": round(flops / seconds / peak_flops(), 3),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        }
        print(name, rows[name], flush=True)
        model.to("cpu")
        torch.cuda.empty_cache()
    result = {
        "env": environment(),
        "command": "python3 bench/stage2.py " + " ".join(sys.argv[1:]),
        "samples": len(samples),
        "real_tokens": real_tokens,
        "padded_tokens_native": padded_tokens,
        **rows,
        "speedup": round(rows["ours_packed"]["samples_per_s"] / rows["native_padded"]["samples_per_s"], 2),
    }
    write(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
