"""Stage-2 (LLM + projector trained) forward + backward on a realistic length mix: ours (padding-free packed rows,
loss on supervised positions only) vs transformers-native Llava (right-padded batches), same process, same weights.

    PYTHONPATH=src python3 bench/stage2.py --batches 10 --batch-size 4 --out bench/results/stage2.json
    PYTHONPATH=src python3 bench/stage2.py --lora --out bench/results/stage2_lora.json     # LoRA r=128 on the LLM
    PYTHONPATH=src python3 bench/stage2.py --profile ...    # + one profiled batch group per variant (where time goes)

Variants (`--variants`, comma-separated): native_padded (transformers Llava, SDPA, right padding, grad ckpt, full
logits), ours_sdpa (packed row, SDPA with the block-diagonal mask, grad ckpt), ours_varlen (packed row, torch's flash
varlen kernel via `attn_implementation="internvl_varlen"`, grad ckpt), ours_varlen_nockpt (no recomputation),
ours_varlen_nockpt_compile (+ each decoder layer torch.compile'd, the trainer's `compile_layers`).

Length mix shaped like LLaVA's mix665k (seeded): 70% single-turn image samples (576 image + 30-150 text tokens),
22% multi-turn image samples (576 + 200-900 text tokens), 8% text-only (100-800 tokens); about half of the text
tokens are supervised. Fwd + bwd only (no optimizer: full 7B AdamW states do not fit
one GPU next to two models). Reports samples/s, real (non-pad) tokens/s and MFU on real tokens (6·N·T for the trained
LLM, 4·N·T + 6·N_lora·T with LoRA, + the vision forward; over the bf16 peak).
"""

import argparse
import random
import sys

import torch
from common import build_pair, environment, peak_flops, profile_top, timed, write

IMAGE_TOKEN, IMAGE_TOKENS = 32000, 576


def sample_mix(n, seed=0, image_tokens=IMAGE_TOKENS):
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
        ids = [1] + ([IMAGE_TOKEN] * image_tokens if image else []) + [rng.randint(100, 30000) for _ in range(text)]
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


def forward_loss(model, group, packed, pixels, device="cuda"):
    """One batch group's training loss: ours on one packed row (varlen boundaries from `cu_seq_lens`, loss on
    supervised positions only), or native on a right-padded batch (full logits)."""
    if packed:
        ids, positions, labels, n = packed_batch(group, device)
        cu = torch.tensor([0] + [len(i) for i, _, _ in group], device=device).cumsum(0).to(torch.int32)
        longest = max(len(i) for i, _, _ in group)
        return model(
            input_ids=ids,
            position_ids=positions,
            labels=labels,
            pixel_values=pixels[:n],
            use_cache=False,
            skip_logits=True,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=longest,
            max_length_k=longest,
        ).loss
    ids, mask, labels, n = padded_batch(group, device)
    return model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels[:n], use_cache=False).loss


VARIANTS = {  # name: (ours?, packed?, attention, gradient checkpointing?, compiled layers?)
    "native_padded": (False, False, "sdpa", True, False),
    "ours_sdpa": (True, True, "sdpa", True, False),
    "ours_varlen": (True, True, "internvl_varlen", True, False),
    "ours_varlen_nockpt": (True, True, "internvl_varlen", False, False),
    "ours_varlen_nockpt_compile": (True, True, "internvl_varlen", False, True),
}


def configure(model, attn, ckpt, compiled):
    """A variant's attention kernel, gradient checkpointing and per-layer compile on `model` (undoing an earlier
    variant's settings; the layers' compiled wrappers are dropped when `compiled` is off)."""
    model.set_attn_implementation(attn)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    for layer in model.model.language_model.layers:
        if compiled:
            layer.compile()
        else:
            layer._compiled_call_impl = None
    model.train()


def speedups(rows) -> dict:
    """{"speedup_vs_native_padded": {variant: samples/s ratio}} when the native row was measured, else {}."""
    native = rows.get("native_padded")
    if not isinstance(native, dict):
        return {}
    return {
        "speedup_vs_native_padded": {
            n: round(r["samples_per_s"] / native["samples_per_s"], 2)
            for n, r in rows.items()
            if isinstance(r, dict) and n != "native_padded"
        }
    }


def add_lora(model, rank=128, alpha=256):
    """LLaVA's LoRA recipe: every Linear of the LLM (not the tower, not lm_head) gets r=128 adapters; projector
    trained in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.05,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=["multi_modal_projector"],
    )
    return get_peft_model(model, config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lora", action="store_true", help="LoRA r=128 on the LLM (LLaVA's lora recipe)")
    parser.add_argument("--profile", action="store_true", help="profile one batch group per variant")
    parser.add_argument("--out", default="bench/results/stage2.json")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    names = args.variants.split(",")

    ours, llava = build_pair(native=any(not VARIANTS[n][0] for n in names))
    samples = sample_mix(args.batches * args.batch_size)
    groups = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    real_tokens = sum(len(i) for i, _, _ in samples)
    images = sum(image for _, _, image in samples)
    llm = sum(p.numel() for p in ours.model.language_model.parameters()) + ours.lm_head.weight.numel()
    llm -= ours.model.language_model.get_input_embeddings().weight.numel()
    vision = sum(p.numel() for p in ours.model.vision_tower.parameters())
    pixels = torch.randn(args.batch_size, 3, 336, 336, device="cuda", dtype=torch.bfloat16)

    def run(model, packed, batch_groups=groups):
        def epoch():
            for group in batch_groups:
                forward_loss(model, group, packed, pixels).backward()
                model.zero_grad(set_to_none=True)

        return epoch

    rows = {}
    padded_tokens = sum(max(len(i) for i, _, _ in g) * len(g) for g in groups)
    models = {True: ours, False: llava}
    for m in (ours, llava):  # one model on the GPU at a time: the no-checkpointing variants need the room
        if m is not None:
            m.to("cpu")
    if args.lora:
        models = {key: add_lora(m) if m is not None else None for key, m in models.items()}
    for name in names:
        is_ours, packed, attn, ckpt, compiled = VARIANTS[name]
        model = models[is_ours]
        base = model.get_base_model() if args.lora else model
        model.to("cuda")
        if not args.lora:
            base.requires_grad_(True)
            base.model.vision_tower.requires_grad_(False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        llm_flops = (4 * llm + 6 * trainable) if args.lora else 6 * llm
        flops = llm_flops * real_tokens + 2 * vision * 577 * images
        configure(base, attn, ckpt, compiled)
        model.train()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(run(model, packed), warmup=2 if compiled else 1, repeat=2)
        except torch.OutOfMemoryError:
            rows[name] = "OOM"
            print(name, "OOM", flush=True)
        else:
            rows[name] = {
                "attention": attn,
                "gradient_checkpointing": ckpt,
                "compiled_layers": compiled,
                "samples_per_s": round(len(samples) / seconds, 2),
                "real_tokens_per_s": round(real_tokens / seconds),
                "mfu_real_tokens": round(flops / seconds / peak_flops(), 3),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            }
            if args.profile:
                rows[name]["profile"] = profile_top(run(model, packed, groups[: max(1, len(groups) // 5)]))
            print(name, rows[name], flush=True)
        model.zero_grad(set_to_none=True)
        model.to("cpu")
        torch.cuda.empty_cache()
    result = {
        "env": environment(),
        "command": "python3 bench/stage2.py " + " ".join(sys.argv[1:]),
        "lora": args.lora,
        "samples": len(samples),
        "real_tokens": real_tokens,
        "padded_tokens_native": padded_tokens,
        **rows,
    }
    result.update(speedups(rows))
    write(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
