"""Shared pieces of the GPU benchmarks: 7B-shaped random models (ours and transformers-native Llava with the SAME
weights), timing with CUDA events, environment record. Run the benchmarks from the repo root on a CUDA machine:

    PYTHONPATH=src python3 bench/decode.py --out bench/results/decode.json
"""

import json
import os
import platform
import subprocess
import time

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def environment() -> dict:
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # BENCH_COMMIT first: the device machine gets a copy of the working tree whose .git may be stale.
    commit = os.environ.get("BENCH_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            commit = ""
    return {
        "gpu": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def peak_flops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989e12)


def llava_7b_config(vocab_size=32064, image_token_id=32000, tiny=False, **text_overrides):
    """Our InternVLChatConfig at LLaVA-1.5-7B shape (CLIP-L/336 + Vicuna-7B); `tiny` for CPU smoke tests."""
    from internvl_chat.presets import build_config

    return build_config(
        "llava-v1.5-7b", vocab_size=vocab_size, image_token_id=image_token_id, tiny=tiny, **text_overrides
    )


def build_pair(dtype=torch.bfloat16, device="cuda", native=True, tiny=False, **text_overrides):
    """(ours, native Llava or None) at 7B shape with identical random weights, on `device`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from internvl_chat import InternVLChatForConditionalGeneration

    config = llava_7b_config(tiny=tiny, **text_overrides)
    # Built directly on the GPU: transformers' own init runs there in seconds and sets every buffer (rotary
    # inv_freq, CLIP position ids) correctly, which a meta-device build followed by to_empty would not.
    torch.manual_seed(0)
    with torch.device(device):
        ours = InternVLChatForConditionalGeneration(config)
    ours = ours.to(dtype).eval()
    if not native:
        return ours, None
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**config.vision_config.to_diff_dict()),
        text_config=LlamaConfig(**config.text_config.to_diff_dict()),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device(device):
        llava = LlavaForConditionalGeneration(llava_config)
    llava = llava.to(dtype)
    llava.load_state_dict(ours.state_dict(), strict=True)
    llava.eval()
    return ours, llava


def prompts(batch, text_tokens=64, image_tokens=576, image_token_id=32000, device="cuda", seed=0):
    """Batch of [BOS, 576 image tokens, text] prompts (no padding) and random pixels."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 30000, (batch, text_tokens), generator=g)
    image = torch.full((batch, image_tokens), image_token_id)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], 1)
    pixel_values = torch.randn(batch, 3, 336, 336, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pixel_values.to(device, torch.bfloat16)


def timed(fn, warmup=1, repeat=3):
    """Median seconds of `fn()` over `repeat` runs after `warmup`, synchronising the device."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def profile_top(fn, rows=12) -> dict:
    """Runs `fn()` once under torch.profiler: GPU busy time vs wall time and the ops that took the most GPU time.

    Categories group kernels by what they are (matmul, attention, the rest), which is what the closing notes need to
    say "where the time goes"."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (compiled graphs, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in kernels) / 1e6 if kernels else 0.0
    categories: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        name = e.name
        low = name.lower()
        if "gemm" in low or "cutlass" in low or "matmul" in low or "nvjet" in low or "sm90_x" in low:
            kind = "matmul"
        elif "flash" in low or "fmha" in low or "attention" in low or "efficient_attention" in low:
            kind = "attention"
        elif "triton" in low:
            kind = "triton (compiled elementwise/norm)"
        elif "nccl" in low:
            kind = "communication"
        else:
            kind = "other kernels (elementwise, norms, copies, loss)"
        categories[kind] = categories.get(kind, 0.0) + e.device_time_total / 1e6
        by_name[name] = by_name.get(name, 0.0) + e.device_time_total / 1e6
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:rows]
    return {
        "wall_s": round(wall, 4),
        "gpu_busy_s": round(total, 4),
        "gpu_idle_fraction": round(max(0.0, 1 - total / wall), 3) if wall else None,
        "categories_s": {k: round(v, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top_kernels_s": [[name[:120], round(t, 4)] for name, t in top],
    }


def write(path, payload):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
