"""Stage 2 with full weights over several GPUs (torch FSDP2, what accelerate's FSDP v2 config runs): training steps
(forward + backward + AdamW) of ours vs transformers-native Llava on the same length mix as `bench/stage2.py`, and the
scaling efficiency against one GPU. Launch with torchrun, one process per GPU; the first command is the one-GPU
baseline (plain model, no FSDP), the second reads it:

    PYTHONPATH=src torchrun --nproc-per-node 1 bench/stage2_fsdp.py --out bench/results/stage2_fsdp_1gpu.json
    PYTHONPATH=src torchrun --nproc-per-node 2 bench/stage2_fsdp.py --baseline bench/results/stage2_fsdp_1gpu.json \
        --out bench/results/stage2_fsdp_2gpu.json
    PYTHONPATH=src torchrun --nproc-per-node 2 bench/stage2_fsdp.py --cpu --tiny --samples 8 ...   # smoke test (gloo)

Every world size runs the SAME samples with the same per-GPU batch (strong scaling): batch group g goes to rank
g % world_size. Sharding: each LLM decoder layer and (frozen) vision encoder layer is an FSDP unit, then the root;
parameters, gradients and AdamW states in bf16 (as the one-GPU bench), reshard after forward (ZeRO-3).
Scaling efficiency = samples/s on W GPUs / (W x samples/s of the same variant on one GPU).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from common import build_pair, environment, peak_flops, write
from stage2 import VARIANTS, configure, forward_loss, sample_mix, speedups

DEFAULT_VARIANTS = "native_padded,ours_varlen,ours_varlen_nockpt_compile"


def shard(model, mesh):
    """FSDP2 units: every LLM decoder layer and vision encoder layer, then the root (embeddings, projector, lm_head,
    the rest of the tower), as accelerate's TRANSFORMER_BASED_WRAP with the config's layer classes."""
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    # [IMPORTANT] the tower's layers, not the tower: sharding the whole CLIPVisionModel swaps its class and
    # transformers' Llava then gets no hidden_states from it (TypeError in get_image_features).
    for layer in model.model.vision_tower.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            fully_shard(layer, mesh=mesh)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def epoch(model, optimizer, groups, packed, pixels, device):
    """This rank's batch groups, one optimizer step each, then wait for every rank."""
    for group in groups:
        forward_loss(model, group, packed, pixels, device).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=80, help="samples per timed epoch, over all GPUs")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per GPU per step")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--fsdp", action="store_true", help="shard even with one process (checks the FSDP path)")
    parser.add_argument("--baseline", help="JSON of the one-GPU run, for scaling efficiency")
    parser.add_argument("--cpu", action="store_true", help="CPU processes over gloo, fp32 (smoke test of the script)")
    parser.add_argument("--tiny", action="store_true", help="tiny model shapes (smoke test of the script)")
    parser.add_argument("--out", default="bench/results/stage2_fsdp.json")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.cpu:
        device, dtype = "cpu", torch.float32
    else:
        torch.cuda.set_device(local)
        device, dtype = f"cuda:{local}", torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    mesh = None
    if world > 1 or args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu" if args.cpu else "cuda", (world,))

    names = args.variants.split(",")
    ours, llava = build_pair(dtype=dtype, device=device, native=any(not VARIANTS[n][0] for n in names), tiny=args.tiny)
    image_tokens, size = ours.config.image_seq_length, ours.config.vision_config.image_size
    samples = sample_mix(args.samples, image_tokens=image_tokens)
    groups = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    if world > 1 and "native_padded" in names and not all(any(img for _, _, img in g) for g in groups):
        # transformers' Llava skips its tower for a batch without images; sharded, the other ranks then wait in
        # the tower's all-gather (ours runs it on a blank image, see InternVLChatModel.forward).
        raise SystemExit("a batch group has no image: native Llava would desync under FSDP; change --samples")
    mine = groups[rank::world]
    real_tokens = sum(len(i) for i, _, _ in samples)
    images = sum(image for _, _, image in samples)
    pixels = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
    llm = sum(p.numel() for p in ours.model.language_model.parameters()) + ours.lm_head.weight.numel()
    llm -= ours.model.language_model.get_input_embeddings().weight.numel()
    vision = sum(p.numel() for p in ours.model.vision_tower.parameters())
    flops = 6 * llm * real_tokens + 2 * vision * (image_tokens + 1) * images
    ours.to("cpu")
    models = {False: llava, True: ours}
    placed = set()  # models already on the GPU (and sharded)
    rows = {}
    # Native first, then it is dropped: ours' variants reuse one (sharded) copy.
    for name in sorted(names, key=lambda n: VARIANTS[n][0]):
        is_ours, packed, attn, ckpt, compiled = VARIANTS[name]
        model = models[is_ours]
        if is_ours not in placed:
            model.to(device)
            model.requires_grad_(True)
            model.model.vision_tower.requires_grad_(False)
            if mesh is not None:
                shard(model, mesh)
            placed.add(is_ours)
        configure(model, attn, ckpt, compiled)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        step = (model, optimizer, mine, packed, pixels, device)
        if not args.cpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(2 if compiled else 1):
                epoch(*step)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                epoch(*step)
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            rows[name] = "OOM"
        except Exception as error:  # recorded, so the other variants still get measured
            rows[name] = f"error: {type(error).__name__}: {error}"[:500]
        else:
            seconds = sorted(times)[1]
            peak = torch.cuda.max_memory_allocated() if not args.cpu else 0
            memory = torch.tensor([peak / 2**30], device=device)
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
            rows[name] = {
                "attention": attn,
                "gradient_checkpointing": ckpt,
                "compiled_layers": compiled,
                "samples_per_s": round(len(samples) / seconds, 2),
                "real_tokens_per_s": round(real_tokens / seconds),
                "mfu_real_tokens_per_gpu": round(flops / seconds / (world * peak_flops()), 3),
                "peak_memory_gb_max_rank": round(memory.item(), 1),
            }
        if rank == 0:
            print(name, rows[name], flush=True)
        del optimizer, step
        if not is_ours:
            models[False] = llava = model = None
        torch.cuda.empty_cache()

    if rank == 0:
        result = {
            "env": environment(),
            "command": f"torchrun --nproc-per-node {world} bench/stage2_fsdp.py " + " ".join(sys.argv[1:]),
            "world_size": world,
            "sharding": "FSDP2 fully_shard per LLM / vision layer + root" if mesh is not None else "none",
            "optimizer": "AdamW (bf16 states)",
            "samples": len(samples),
            "batch_size_per_gpu": args.batch_size,
            "real_tokens": real_tokens,
            **rows,
        }
        result.update(speedups(rows))
        if args.baseline:
            with open(args.baseline) as f:
                base = json.load(f)
            result["scaling_efficiency"] = {
                n: round(r["samples_per_s"] / (world * base[n]["samples_per_s"]), 3)
                for n, r in rows.items()
                if isinstance(r, dict) and isinstance(base.get(n), dict)
            }
        write(args.out, result)
        print(json.dumps(result, indent=1), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
