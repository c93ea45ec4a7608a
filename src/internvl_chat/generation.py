"""Fast greedy decoding for InternVL-Chat models: static KV cache + one compiled, CUDA-graphed decode step.

    from internvl_chat.generation import FastGreedyDecoder
    decoder = FastGreedyDecoder(model, max_batch_size=16, max_length=2048)   # compile once, reuse
    new_tokens = decoder.generate(input_ids, attention_mask, pixel_values, max_new_tokens=128)

Same tokens as `model.generate(..., do_sample=False)` (tested on CPU without compile), faster because:
- prefill runs once, batched, through the normal forward (vision features computed once per image);
- each decode step is one `torch.compile(mode="reduce-overhead")` graph (embedding → LLM → last-position lm_head →
  argmax) replayed from static buffers, with the 4D mask built on the device;
- the host checks for end-of-sequence only every `sync_every` steps (no per-token device→host sync), and no logits
  processors or stopping-criteria objects run per token;
- `attention` picks the SDPA backend the step is traced with (`DECODE_ATTENTION`; default "auto", PyTorch's own
  choice). On an H100 at batch 1 the decode step's attention is about 6 % of its GPU time (83 % is the weight
  GEMVs), so the choice matters little there; `bench/decode.py --variants` times each backend.
Used by the eval runner when `--fast-decode` is set (`internvl-chat eval --fast-decode`,
`internvl_chat.eval.runner.generate_predictions(fast_decode=True)`, which builds one decoder per model and reuses it);
the server decodes with its own slot engine (`serve/batching.py`). On a GPU in fp16/bf16 the compiled step's
arithmetic is not `generate`'s bit for bit, so a near-tie between two logits can pick a different token.
`bench/decode.py` measures it against transformers' native Llava, `bench/eval_throughput.py --fast-decode` in the
eval runner.
"""

import contextlib
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import StaticCache

from .modeling.modeling_internvl_chat import CACHE_KWARG

logger = logging.getLogger(__name__)

# SDPA backend(s) a decode step is traced with; None keeps PyTorch's own choice (cuDNN / flash / efficient / math).
DECODE_ATTENTION = {
    "auto": None,
    "math": [SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}


def attention_backend(name: str):
    """A context manager that restricts SDPA to the `DECODE_ATTENTION[name]` backends (nothing for "auto")."""
    if name not in DECODE_ATTENTION:
        raise ValueError(f"unknown decode attention {name!r}; choose one of {', '.join(DECODE_ATTENTION)}")
    backends = DECODE_ATTENTION[name]
    return contextlib.nullcontext() if backends is None else sdpa_kernel(backends)


class FastGreedyDecoder:
    """Greedy decoding with a static cache; buffers sized for `max_batch_size` × `max_length` tokens."""

    def __init__(
        self,
        model,
        max_batch_size: int,
        max_length: int,
        compile: bool | None = None,
        sync_every: int = 16,
        compile_mode: str = "reduce-overhead",
        attention: str = "auto",
    ):
        attention_backend(attention)  # validates the name before anything compiles
        self.attention = attention
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.sync_every = sync_every
        device = next(model.parameters()).device
        self.device = device
        use_compile = device.type == "cuda" if compile is None else compile
        # [IMPORTANT] "reduce-overhead" captures the step as a CUDA graph; its inputs must keep their addresses, so
        # the step reads from the preallocated buffers below and every shape is fixed (batch, cache length).
        self._step = (
            torch.compile(self._decode_step, mode=compile_mode, fullgraph=False) if use_compile else self._decode_step
        )

    def _new_cache(self):
        return StaticCache(config=self.model.config.get_text_config(), max_cache_len=self.max_length)

    def _decode_step(self, tokens, positions, mask, cache):
        """tokens (B, 1), positions (B, 1), mask (B, 1, 1, L) bool → next tokens (B,)."""
        lm = self.model.model.language_model
        # Inside the traced function, so the compiler guards on `self.attention` (a decoder with another backend
        # gets its own graph instead of reusing the first decoder's).
        with attention_backend(self.attention):
            out = lm(
                input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache}
            )
        return self.model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)

    @torch.no_grad()
    def generate(
        self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 128, eos_token_id=None
    ):
        """Left-padded prompts (B, T) → new token ids (B, max_new_tokens); positions after EOS hold EOS."""
        batch, prompt_len = input_ids.shape
        if batch > self.max_batch_size or prompt_len + max_new_tokens > self.max_length:
            raise ValueError(
                f"batch {batch} × {prompt_len}+{max_new_tokens} tokens exceeds the decoder's buffers "
                f"({self.max_batch_size} × {self.max_length})"
            )
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        eos = torch.tensor(sorted(token_ids(eos_token_id)) or [-1], device=device)

        # Prefill: the regular forward (vision tower + merge + LLM), writing into a fresh static cache.
        cache = self._new_cache()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values.to(device) if pixel_values is not None else None,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_tokens = out.logits[:, -1].argmax(-1)

        # Decode: a fixed (B, 1, 1, L) mask — the prompt's padding masked out, slots up to the current one open.
        key_ok = torch.zeros(batch, self.max_length, dtype=torch.bool, device=device)
        key_ok[:, :prompt_len] = attention_mask.bool()
        slots = torch.arange(self.max_length, device=device)
        position = positions[:, -1:] + 1
        result = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_tokens = torch.where(finished, eos[0], next_tokens)
            result[:, step] = next_tokens
            finished |= torch.isin(next_tokens, eos)
            if step == max_new_tokens - 1:
                break
            if (step + 1) % self.sync_every == 0 and bool(finished.all()):
                result[:, step + 1 :] = eos[0]
                break
            key_ok[:, prompt_len + step] = True
            mask = (key_ok & (slots <= prompt_len + step))[:, None, None, :]
            next_tokens = self._step(next_tokens[:, None].clone(), position.clone(), mask, cache).clone()
            position = position + 1
        return result


def token_ids(value) -> list[int]:
    """None, one id or several (a generation config's `eos_token_id`) → a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
