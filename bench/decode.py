"""Greedy decode benchmark: ours vs transformers-native Llava, same process, same 7B-shaped random weights.

    PYTHONPATH=src python3 bench/decode.py --batch-sizes 1 16 64 --new-tokens 128 --out bench/results/decode.json
    PYTHONPATH=src python3 bench/decode.py --batch-sizes 16 --profile ...   # + where the time goes
    PYTHONPATH=src python3 bench/decode.py --batch-sizes 1 --variants auto math math+cdt --skip native ours

`--variants` times `FastGreedyDecoder` once per decode-attention backend (`generation.DECODE_ATTENTION`: auto, math,
efficient, cudnn); a `+cdt` suffix turns on inductor's coordinate-descent tuning for that and every later variant,
`+autotune` compiles that variant's step with mode "max-autotune", `+unfused` decodes through the language model's own
forward instead of `FusedDecodeStack` (fused q/k/v and gate/up projections, the default).

Prompts are [BOS, 576 image tokens, 64 text tokens] with random pixels. For each batch size it times (median of
runs after warm-up, end to end including prefill): native `generate` (dynamic cache), native `generate` with
`cache_implementation="static"` (transformers compiles the step itself: its best effort), ours through `generate`,
and ours through `FastGreedyDecoder`; plus time to first token and the decode-only rate (tokens after the first
over the time after the first). Prints one JSON object.
"""

import argparse
import sys

import torch
from common import build_pair, environment, profile_top, prompts, timed, write

from internvl_chat.generation import FastGreedyDecoder


def decoder_for(ours, batch, length, compile_mode, variant):
    """`variant` = attention backend [+cdt] [+autotune] [+unfused]."""
    attention, *tuning = variant.split("+")
    if "cdt" in tuning:  # global and sticky: applies to this and every later compile in the process
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if "autotune" in tuning:
        compile_mode = "max-autotune"
    fuse = "unfused" not in tuning  # +unfused: the language model's own forward instead of `FusedDecodeStack`
    return FastGreedyDecoder(ours, batch, length, compile_mode=compile_mode, attention=attention, fuse=fuse)


def run_batch(ours, llava, batch, n, skip, compile_mode="reduce-overhead", profile=False, variants=("auto",)):
    ids, mask, pixels = prompts(batch)
    common = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False)
    length = ids.shape[1] + n + 8
    decoder = decoder_for(ours, batch, length, compile_mode, variants[0])
    workloads = {
        "native": (lambda: llava.generate(**common, max_new_tokens=n, min_new_tokens=n), 1),
        "native_static": (
            lambda: llava.generate(**common, max_new_tokens=n, min_new_tokens=n, cache_implementation="static"),
            2,
        ),
        "ours": (lambda: ours.generate(**common, max_new_tokens=n, min_new_tokens=n), 1),
        "ours_fast": (lambda: decoder.generate(ids, mask, pixels, max_new_tokens=n), 2),
    }
    row = {"batch": batch, "new_tokens": n, "prompt_tokens": ids.shape[1], "variants": list(variants)}
    if "native" not in skip or "native_static" not in skip:
        row["ttft_native_s"] = timed(lambda: llava.generate(**common, max_new_tokens=1), warmup=1, repeat=3)
    row["ttft_ours_s"] = timed(lambda: decoder.generate(ids, mask, pixels, max_new_tokens=1), warmup=1, repeat=3)
    for name, (fn, warmup) in workloads.items():
        if name in skip:
            continue
        seconds = timed(fn, warmup=warmup, repeat=2 if batch == 1 else 3)
        row[f"{name}_tokens_per_s"] = round(batch * n / seconds, 1)
        ttft = row["ttft_ours_s"] if name.startswith("ours") else row.get("ttft_native_s")
        if ttft:
            row[f"{name}_decode_only_tokens_per_s"] = round(batch * (n - 1) / (seconds - ttft), 1)
        print(f"batch {batch:>3} {name:<14} {batch * n / seconds:9.1f} tokens/s", flush=True)
    decoders = {"ours_fast": decoder}
    for variant in variants[1:]:  # the first variant is `ours_fast` above
        other = decoders[f"ours_fast[{variant}]"] = decoder_for(ours, batch, length, compile_mode, variant)
        seconds = timed(lambda other=other: other.generate(ids, mask, pixels, max_new_tokens=n), warmup=2, repeat=3)
        ttft = timed(lambda other=other: other.generate(ids, mask, pixels, max_new_tokens=1), warmup=0, repeat=3)
        row[f"ours_fast[{variant}]_tokens_per_s"] = round(batch * n / seconds, 1)
        row[f"ours_fast[{variant}]_decode_only_tokens_per_s"] = round(batch * (n - 1) / (seconds - ttft), 1)
        print(f"batch {batch:>3} ours_fast[{variant}] {batch * n / seconds:9.1f} tokens/s", flush=True)
        if profile:
            key = f"profile_ours_fast[{variant}]"
            row[key] = profile_top(lambda other=other: other.generate(ids, mask, pixels, n))
    # Same greedy tokens? In bf16 a near-tie flips a token and everything after it, so exact agreement is a weak
    # signal; the check is teacher-forced: re-score each decoder's tokens with ONE native forward and report how far
    # the chosen token's logit is below the native argmax (0 for an exact greedy decode, ~bf16 noise otherwise).
    ref = llava.generate(**common, max_new_tokens=n, min_new_tokens=n)[:, ids.shape[1] :]
    fast = decoder.generate(ids, mask, pixels, n)
    row["fast_vs_native_token_agreement"] = round(float((ref == fast).float().mean()), 4)
    checked = {"native": ref} | {name: d.generate(ids, mask, pixels, n) for name, d in decoders.items()}
    for name, tokens in checked.items():
        with torch.no_grad():
            full = torch.cat([ids, tokens], 1)
            logits = llava(input_ids=full, pixel_values=pixels, logits_to_keep=n + 1).logits[:, :-1].float()
        chosen = logits.gather(-1, tokens[..., None])[..., 0]
        gap = logits.max(-1).values - chosen
        row[f"{name}_teacher_forced_max_logit_gap"] = round(float(gap.max()), 4)
        row[f"{name}_teacher_forced_argmax_share"] = round(float((gap == 0).float().mean()), 4)
    if profile:  # where a decode's time goes (prefill included), ours vs transformers' best effort
        row["profile_ours_fast"] = profile_top(lambda: decoder.generate(ids, mask, pixels, max_new_tokens=n))
        if "native_static" not in skip:
            row["profile_native_static"] = profile_top(workloads["native_static"][0])
    fast = row.get("ours_fast_tokens_per_s")
    for base in ("native", "native_static"):
        if fast and row.get(f"{base}_tokens_per_s"):
            row[f"speedup_vs_{base}"] = round(fast / row[f"{base}_tokens_per_s"], 2)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip", nargs="*", default=[], help="workloads to skip: native native_static ours ours_fast")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the decode step")
    parser.add_argument("--profile", action="store_true", help="profile one decode of ours_fast and native_static")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["auto"],
        help="decoders to time: attention backend [+cdt] [+autotune] [+unfused]",
    )
    parser.add_argument("--out", default="bench/results/decode.json")
    args = parser.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # one compiled step per decoder (variant × batch size)
    ours, llava = build_pair()
    results = {"env": environment(), "command": "python3 bench/decode.py " + " ".join(sys.argv[1:]), "rows": []}
    for batch in args.batch_sizes:
        row = run_batch(
            ours, llava, batch, args.new_tokens, args.skip, args.compile_mode, args.profile, tuple(args.variants)
        )
        results["rows"].append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    results["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    write(args.out, results)
    print(results)


if __name__ == "__main__":
    main()
