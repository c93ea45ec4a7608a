"""Serving under load: 64 concurrent streams x 128 new tokens through our continuous-batching engine, our old window
engine (one `generate` call per batch) and transformers' own continuous batching, same process, same weights.

    # GPU (the issue's row; 7B shapes, random weights, bf16):
    PYTHONPATH=src python3 bench/serve_cb.py --streams 64 --max-tokens 128 --out bench/results/serve_cb.json
    # + the same two engines behind our HTTP server (streaming clients; uvicorn shares this process):
    PYTHONPATH=src python3 bench/serve_cb.py --engines continuous,window,transformers_cb,continuous_http,window_http
    # CPU smoke test (tiny random model, fp32, seconds):
    PYTHONPATH=src python3 bench/serve_cb.py --tiny --streams 8 --max-tokens 16

Workload: `--streams` requests arrive at once (one 336x336 random image + a short question each, through our
processor: 576 image tokens + the chat template), greedy, `--max-tokens` new tokens (random weights almost never emit
EOS, so answers are full length; the mean is reported), after a warm-up burst. Each engine is measured in process at
its request interface (no HTTP: the peer has no server), the same way for all three; time to first token is when
the first token was generated (`RequestHandle.first_token_at`; for ours the first streamed text is reported too):

- `continuous`: `serve.engine.Engine(scheduler="continuous")`, `max_batch_size=streams` slots, the cache sized to the
  longest prompt + max tokens (`--max-cache-len` of the server); requests consumed as streams.
- `window`: the same engine with `scheduler="window"` (the previous engine), `max_batch_size=streams`.
- `transformers_cb`: `generate_batch` (its ContinuousBatchingManager; default config, its own CUDA graphs, flash
  attention if installed, else sdpa) on a native `LlamaForCausalLM` that shares our model's language-model weights
  (transformers' continuous batching takes token ids only, so it cannot run our vision tower: it gets prompts of the
  same length, the 576 image placeholders replaced by random token ids distinct per request — identical placeholders
  would let its prefix cache skip them, which real images would not — and skips the image encoding, which favours
  it slightly). Time to first token = its first token's timestamp - the request's creation time.

Tokens/s = generated tokens / (last request finished - first request submitted). Prints and writes one JSON object
(GPU, versions, command, commit).
"""

import argparse
import contextlib
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, write
from PIL import Image


def requests(engine, count: int) -> list:
    prepared = []
    for i in range(count):
        rgb = (np.random.default_rng(i).random((336, 336, 3)) * 255).astype("uint8")
        image = Image.open(io.BytesIO(_png(rgb))).convert("RGB")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": f"Describe image {i} in detail."}],
            }
        ]
        prepared.append(engine.prepare(messages, [image]))
    return prepared


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def summary(ttft: list[float], tokens: list[int], wall: float) -> dict:
    ttft = sorted(ttft)
    return {
        "requests": len(ttft),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4),
        "mean_completion_tokens": round(statistics.mean(tokens), 1),
        "wall_s": round(wall, 3),
    }


def burst(engine, prepared: list, max_tokens: int) -> dict:
    """All requests submitted at once; one consumer thread per stream."""
    from internvl_chat.serve.engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens)
    started = time.monotonic()  # the clock of `RequestHandle.first_token_at`
    handles = [engine.submit(item, params) for item in prepared]
    first: dict[int, float] = {}
    done: dict[int, float] = {}

    def consume(index, handle):
        for _ in handle.stream():
            first.setdefault(index, time.monotonic())
        done[index] = time.monotonic()

    threads = [threading.Thread(target=consume, args=(i, h)) for i, h in enumerate(handles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(done.values()) - started
    ttft = [h.first_token_at - started for h in handles]
    result = summary(ttft, [h.result.completion_tokens for h in handles], wall)
    # What a streaming client sees: text is held back while it may still change (a partial character, trailing
    # whitespace, a possible stop-string prefix), so the first text can come a token or more after the first token.
    text = sorted(first.get(i, done[i]) - started for i in range(len(handles)))
    result["first_text_p50_s"] = round(statistics.median(text), 4)
    result["first_text_p95_s"] = round(text[min(len(text) - 1, int(0.95 * len(text)))], 4)
    return result


async def http_burst(url: str, streams: int, max_tokens: int) -> dict:
    """The same burst through the HTTP server: `streams` streaming clients (bench/serve_latency.py's client: the same
    image and question per index as `requests`), time to first token = first streamed text at the client."""
    import asyncio

    import httpx
    from serve_latency import one_request

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, "bench", i, max_tokens) for i in range(streams)))
        wall = time.perf_counter() - started
    return summary([r["ttft"] for r in results], [r["tokens"] for r in results], wall)


def run_ours(model, processor, prepared, args, name: str) -> dict:
    from internvl_chat.serve.engine import Engine

    scheduler, http = name.removesuffix("_http"), name.endswith("_http")
    cache_len = max(len(p.input_ids) for p in prepared) + args.max_tokens
    cache_len = -(-cache_len // 64) * 64
    engine = Engine(
        model,
        processor,
        max_batch_size=args.streams,
        batch_window=args.batch_window_ms / 1000,
        max_queue=len(prepared) + 8,
        request_timeout=3600,
        scheduler=scheduler,
        max_cache_len=cache_len if scheduler == "continuous" else None,
        max_prefill_tokens=args.max_prefill_tokens,
    ).start()
    try:
        with contextlib.ExitStack() as stack:
            if http:
                import asyncio

                from serve_latency import serving

                url = stack.enter_context(serving(engine, "bench", args.max_tokens))

                def run_burst(n):
                    return asyncio.run(http_burst(url, args.streams, n))
            else:

                def run_burst(n):
                    return burst(engine, prepared, n)

            started = time.perf_counter()
            run_burst(min(8, args.max_tokens))  # warm-up: compile, CUDA graphs, allocator
            warm = time.perf_counter() - started
            result = run_burst(args.max_tokens)
            status = engine.status()
    finally:
        engine.stop()
    result["warm_up_s"] = round(warm, 2)
    result["engine"] = {k: status[k] for k in ("scheduler", "batches", "batched_rows", "max_batch_seen")}
    if http:
        result["measured"] = "HTTP server (create_app + uvicorn in this process), streaming clients; TTFT = first text"
    if scheduler == "continuous":
        result["engine"].update(
            max_cache_len=cache_len, compiled=engine.slots.compiled, max_prefill_tokens=args.max_prefill_tokens
        )
    print(f"{name:<16} {result['tokens_per_s']:9.1f} tokens/s  ttft p50 {result['ttft_p50_s']:.3f}s", flush=True)
    return result


def run_transformers_cb(model, prepared, args) -> dict:
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    text_config = model.config.get_text_config(decoder=True)
    with torch.device("meta"):
        peer = AutoModelForCausalLM.from_config(text_config)
    # The same modules (no copy): our language model and head inside a native causal-LM wrapper.
    setattr(peer, peer.base_model_prefix, model.model.language_model)
    peer.lm_head = model.lm_head
    peer.eval()
    eos = model.generation_config.eos_token_id
    image_token = model.config.image_token_id

    def distinct(ids: list[int], seed: int) -> list[int]:
        # Text-only, the 576 image placeholders would be the same ids in every prompt, and transformers' prefix
        # sharing would compute them once for all requests (and reuse the warm-up's): with real images their keys
        # and values differ per request. Random ids per request (and per call) keep the same length and work.
        g = torch.Generator().manual_seed(seed)
        return [int(torch.randint(100, 30000, (1,), generator=g)) if t == image_token else t for t in ids]

    inputs = [distinct(p.input_ids, i) for i, p in enumerate(prepared)]
    warm_inputs = [distinct(p.input_ids, 10_000 + i) for i, p in enumerate(prepared)]

    def generation_config(n):
        return GenerationConfig(
            max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=model.generation_config.pad_token_id
        )

    cb_config = ContinuousBatchingConfig(max_requests_per_batch=args.streams)
    started = time.perf_counter()
    peer.generate_batch(warm_inputs, generation_config(min(8, args.max_tokens)), cb_config, persistent_manager=True)
    warm = time.perf_counter() - started
    outputs = peer.generate_batch(
        inputs, generation_config(args.max_tokens), cb_config, record_timestamps=True, persistent_manager=True
    )
    # Each call builds a fresh paged cache: its counter (transformers <= 5.17) covers this call only.
    cache = _peer_cache(peer)
    sharing = getattr(cache, "use_prefix_sharing", None)
    shared = getattr(cache, "_total_prefix_length", None)
    attn = peer.config._attn_implementation
    peer.destroy_cached_continuous_batching_manager()
    outputs = list(outputs.values())
    errors = [o.error for o in outputs if o.error]
    if errors or len(outputs) != len(inputs):
        raise RuntimeError(f"transformers CB: {len(outputs)}/{len(inputs)} results, errors {errors[:3]}")
    start = min(o.created_time for o in outputs)
    end = max(o.timestamps[-1] for o in outputs)
    ttft = [o.timestamps[0] - o.created_time for o in outputs]
    result = summary(ttft, [len(o.generated_tokens) for o in outputs], end - start)
    result["warm_up_s"] = round(warm, 2)
    result["attn_implementation"] = attn
    result["prefix_sharing"] = sharing
    if shared is not None:
        result["prefix_shared_tokens"] = shared  # prompt tokens its prefix cache did not recompute
    result["prompts"] = "our prompt ids with the image placeholders replaced by random ids, distinct per request"
    result["model"] = f"native {type(peer).__name__} sharing our language model's weights (text only)"
    print(f"{'transformers_cb':<16} {result['tokens_per_s']:9.1f} tokens/s  ttft p50 {result['ttft_p50_s']:.3f}s")
    return result


def _peer_cache(peer):
    """transformers' paged cache of the persistent manager (for its prefix-sharing counter), or None."""
    manager = getattr(peer, "_cached_continuous_batching_manager", None)
    processor = getattr(manager, "batch_processor", None)
    return getattr(processor, "cache", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-v1.5-7b")
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU in fp32 (smoke test)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument(
        "--engines",
        default="continuous,window,transformers_cb",
        help="comma-separated subset of window, continuous, transformers_cb, and window_http / continuous_http (the "
        "same engines behind our HTTP server, streaming clients)",
    )
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()

    import internvl_chat  # noqa: F401
    from internvl_chat.serve.engine import Engine

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    from serve_latency import build_random_model

    model, processor, _ = build_random_model(args.preset, dtype, device, tiny=args.tiny)
    prepared = requests(Engine(model, processor, scheduler="window"), args.streams)
    report = {
        **environment(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": f"{args.preset} ({'tiny, ' if args.tiny else ''}random weights), {dtype}".replace("torch.", ""),
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "prompt_tokens": len(prepared[0].input_ids),
        "engines": {},
    }
    # transformers' CB may switch the shared language model's attention implementation: it runs last.
    names = ("window", "window_http", "continuous", "continuous_http", "transformers_cb")
    order = [e for e in names if e in args.engines.split(",")]
    for name in order:
        if name == "transformers_cb":
            report["engines"][name] = run_transformers_cb(model, prepared, args)
        else:
            report["engines"][name] = run_ours(model, processor, prepared, args, name)
        if device == "cuda":
            torch.cuda.empty_cache()
    engines = report["engines"]
    if "continuous" in engines:
        ours = engines["continuous"]
        for peer in ("window", "transformers_cb"):
            if peer in engines:
                report[f"continuous_vs_{peer}_tokens_per_s"] = round(
                    ours["tokens_per_s"] / engines[peer]["tokens_per_s"], 2
                )
                report[f"continuous_vs_{peer}_ttft_p50"] = round(ours["ttft_p50_s"] / engines[peer]["ttft_p50_s"], 2)
    import json

    print(json.dumps(report, indent=2))
    if args.out:
        write(args.out, report)


if __name__ == "__main__":
    main()
