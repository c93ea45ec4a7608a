"""Serving latency on a GPU: time to first token and tokens/s at 1 and 16 concurrent streaming clients.

    python bench/serve_latency.py                                  # 7B-shaped random LLaVA-1.5 (bf16), in memory
    python bench/serve_latency.py --model DIR                      # a real checkpoint folder instead
    python bench/serve_latency.py --clients 1,16,32 --max-tokens 256 --requests-per-client 4

The model (random weights, real shapes: CLIP-L/336 + Vicuna-7B, 576 image tokens) is built directly on the GPU,
served by the real FastAPI app (`internvl_chat.serve.server.create_app`) under uvicorn on 127.0.0.1 in a thread of
this process, and driven by asyncio clients streaming `/v1/chat/completions` (one 336x336 image + a question each,
greedy, `max_tokens` new tokens; random weights almost never emit EOS, so every answer is full length).
Prints one JSON object: per concurrency level, p50/p95 time to first token, p50 per-request decode tokens/s and
aggregate generated tokens/s.
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "vicuna-v1.5"


def build_random_model(preset: str, dtype: torch.dtype, device: str, tiny: bool = False):
    """Random model at the preset's shapes (or tiny) built directly on `device` (no 14 GB checkpoint on disk)."""
    from internvl_chat.factories import create
    from internvl_chat.modeling import InternVLChatForConditionalGeneration

    meta_model, processor, counts = create(preset, None, tokenizer=str(TOKENIZER), tiny=tiny)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = InternVLChatForConditionalGeneration(meta_model.config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = meta_model.generation_config
    return model.eval(), processor, counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(engine, name: str, max_tokens: int):
    """Our FastAPI app over a started `engine`, under uvicorn on 127.0.0.1 in a thread; yields the chat URL and stops
    the server on exit (the engine is the caller's)."""
    import uvicorn

    from internvl_chat.serve.server import ServerConfig, create_app

    app = create_app(engine, ServerConfig(model_name=name, max_tokens_limit=max(max_tokens, 2048)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.should_exit = True
        thread.join(30)


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((336, 336, 3)) * 255).astype("uint8")).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def one_request(client, url: str, model: str, seed: int, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(seed)}},
                    {"type": "text", "text": f"Describe image {seed} in detail."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    done = time.perf_counter()
    first = first or done
    return {"ttft": first - started, "latency": done - started, "tokens": tokens, "decode_s": done - first}


async def level(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        await one_request(client, url, model, 0, 4)  # warm-up

        async def user(index):
            return [
                await one_request(client, url, model, 1000 * clients + index * per_client + r, max_tokens)
                for r in range(per_client)
            ]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    ttft = sorted(r["ttft"] for r in results)
    decode = [(r["tokens"] - 1) / r["decode_s"] for r in results if r["tokens"] > 1 and r["decode_s"] > 0]
    return {
        "clients": clients,
        "requests": len(results),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4),
        "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
        "per_request_decode_tokens_per_s_p50": round(statistics.median(decode), 1) if decode else None,
        "aggregate_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "mean_completion_tokens": round(statistics.mean(r["tokens"] for r in results), 1),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-v1.5-7b")
    parser.add_argument("--model", help="a checkpoint folder instead of the random preset model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--attn-implementation", default=None)
    args = parser.parse_args()

    import internvl_chat  # noqa: F401
    from internvl_chat.serve.engine import Engine

    dtype = getattr(torch, args.dtype)
    if args.model:
        from internvl_chat.loading import load_model

        model, processor = load_model(
            args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation
        )
        counts = {"total": sum(p.numel() for p in model.parameters())}
    else:
        model, processor, counts = build_random_model(args.preset, dtype, args.device)
        if args.attn_implementation:
            model.set_attn_implementation(args.attn_implementation)
    engine = Engine(
        model,
        processor,
        max_batch_size=args.max_batch_size,
        batch_window=args.batch_window_ms / 1000,
        max_queue=1024,
        request_timeout=3600,
    ).start()
    name = "bench"
    try:
        with serving(engine, name, args.max_tokens) as url:
            levels = [
                asyncio.run(level(url, name, int(c), args.requests_per_client, args.max_tokens))
                for c in args.clients.split(",")
            ]
    finally:
        engine.stop()
    report = {
        "model": args.model or f"{args.preset} (random weights, real shapes)",
        "parameters": counts.get("total"),
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "image_tokens_per_request": processor.image_seq_length,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "engine": {k: v for k, v in engine.status().items() if k in ("batches", "batched_rows", "max_batch_seen")},
        "levels": levels,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
