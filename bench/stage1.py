"""Stage-1 (projector-only) training step: ours vs transformers-native Llava, same process, same 7B-shaped weights.

    PYTHONPATH=src python3 bench/stage1.py --batch-size 16 --text-tokens 64 --out bench/results/stage1.json
    PYTHONPATH=src python3 bench/stage1.py --variants ckpt_compile no_ckpt_compile --profile ...   # where time goes

Each sample is [BOS, 576 image tokens, 63 text tokens] with the last 32 text tokens supervised (a caption), gradient
checkpointing on, only the projector trainable (AdamW), bf16 weights. Times forward + backward + optimizer step
(median after warm-up) and reports samples/s, MFU (vision forward + 4·N·T for the frozen LLM, over the GPU's bf16
peak) and peak memory. Ours runs the frozen tower under no_grad and computes the loss on supervised positions only.
"""

import argparse
import sys

import torch
from common import build_pair, environment, peak_flops, profile_top, prompts, timed, write


def step_fn(model, batch, ours: bool):
    ids, mask, pixels, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        kwargs = {"skip_logits": True} if ours else {}
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, **kwargs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    return step


def prepare(model, checkpointing=True, compile_layers=False):
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    if compile_layers:
        # [IMPORTANT] a fresh dynamo state: graphs compiled for an earlier variant (other checkpointing setting) do
        # not apply, and the recompiles can fall back to eager (seen: no triton kernels in the profile).
        torch._dynamo.reset()
        # Per-layer compile: fuses RMSNorm / rotary / SiLU-mul around the matmuls; one graph reused by all layers.
        for layer in model.model.language_model.layers:
            layer.compile()
    model.config.use_cache = False
    model.train()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=63)
    parser.add_argument(
        "--variants", nargs="*", default=["no_ckpt", "no_ckpt_compile"], help="of no_ckpt no_ckpt_compile ckpt_compile"
    )
    parser.add_argument("--profile", action="store_true", help="profile one step of each variant")
    parser.add_argument("--out", default="bench/results/stage1.json")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True

    ours, llava = build_pair()
    ids, mask, pixels = prompts(args.batch_size, text_tokens=args.text_tokens)
    labels = ids.clone()
    labels[:, : ids.shape[1] - 32] = -100
    batch = (ids, mask, pixels, labels)
    tokens = ids.numel()
    llm_params = sum(p.numel() for p in ours.model.language_model.parameters()) + ours.lm_head.weight.numel()
    llm_params -= ours.model.language_model.get_input_embeddings().weight.numel()
    vision_params = sum(p.numel() for p in ours.model.vision_tower.parameters())
    flops = 4 * llm_params * tokens + 2 * vision_params * 577 * args.batch_size

    rows = {}
    variants = [("native", llava, {}), ("ours", ours, {})]
    if "no_ckpt" in args.variants:
        variants.append(("ours_no_ckpt", ours, {"checkpointing": False}))
    if "no_ckpt_compile" in args.variants:
        variants.append(("ours_no_ckpt_compile", ours, {"checkpointing": False, "compile_layers": True}))
    if "ckpt_compile" in args.variants:  # compiled layers stay compiled: this variant comes last
        variants.append(("ours_ckpt_compile", ours, {"checkpointing": True, "compile_layers": True}))
    for name, model, options in variants:
        model.to("cuda")
        prepare(model, **options)
        torch.cuda.reset_peak_memory_stats()
        step = step_fn(model, batch, ours=name.startswith("ours"))
        seconds = timed(step, warmup=3, repeat=5)
        rows[name] = {
            "samples_per_s": round(args.batch_size / seconds, 2),
            "step_s": round(seconds, 4),
            "mfu": round(flops / seconds / peak_flops(), 3),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        }
        if args.profile:
            rows[name]["profile"] = profile_top(step)
        print(name, rows[name], flush=True)
        model.to("cpu")
        torch.cuda.empty_cache()
    result = {
        "env": environment(),
        "command": "python3 bench/stage1.py " + " ".join(sys.argv[1:]),
        "batch_size": args.batch_size,
        "tokens_per_sample": ids.shape[1],
        "model_flops_per_step": flops,
        **rows,
        "speedup": {k: round(v["samples_per_s"] / rows["native"]["samples_per_s"], 2) for k, v in rows.items()},
    }
    write(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
