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
- `fuse=True` (Llama-family language models) runs the decode step through `FusedDecodeStack`: the q/k/v and gate/up
  projections as one matrix each, so a layer's step is 4 weight GEMVs instead of 7 (fewer, larger kernels and fewer
  split-K reductions). Measured on an H100 (7B, bf16, same run): batch 1 150.9 → 162.2 tok/s, batch 16 1 460 → 1 522;
  the fused step's GEMVs run at about 85 % of the memory bandwidth;
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
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn
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


# language model → its layers' fused (qkv weight, qkv bias, gate/up weight, gate/up bias); weak keys: the tensors
# do not keep the model alive.
_FUSED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class FusedDecodeStack:
    """A decode-only forward of a Llama-family language model with its q/k/v and gate/up projections fused.

    `FusedDecodeStack.build(lm)` returns None (and logs why) for a model it cannot fuse; otherwise calling the stack
    with (tokens (B, 1), positions (B, 1), mask (B, 1, 1, L) bool, cache) returns the last hidden state (B, 1, D), the
    same arithmetic as `lm(...)` with one GEMV where the model runs three (q, k, v) or two (gate, up).

    Memory: no copy of the weights is kept. The fused matrix takes over the storage and each original parameter
    becomes a row-slice view of it, so the model's own forward, its optimizer state and `save_pretrained` (which
    clones disjoint shared tensors) see the same values as before. If the parameters are later moved or replaced
    (`model.to(...)`), `refresh()` notices that the views no longer alias the fused matrix and fuses again.
    """

    FUSABLE = ("llama",)  # model_types whose decoder layers are LlamaDecoderLayer-shaped

    def __init__(self, lm):
        self.lm = lm
        # Shared by every stack on this model (one decoder per batch shape): a second stack must not fuse again,
        # or the two would take the storage from each other at every switch.
        self.fused = _FUSED.setdefault(lm, [])
        self.refresh()

    @classmethod
    def build(cls, lm):
        reason = cls.unsupported(lm)
        if reason:
            logger.info("decode step not fused: %s", reason)
            return None
        return cls(lm)

    @classmethod
    def unsupported(cls, lm) -> str | None:
        """Why `lm` cannot be fused, or None."""
        config = lm.config
        if config.model_type not in cls.FUSABLE:
            return f"model_type {config.model_type!r} (fusable: {', '.join(cls.FUSABLE)})"
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
            return "layers other than full attention"
        # A device map (accelerate hooks move activations between layers' devices), offloaded or meta weights.
        devices = {p.device for p in lm.parameters()}
        if (
            len(devices) > 1
            or "meta" in {d.type for d in devices}
            or any(hasattr(m, "_hf_hook") for m in lm.modules())
        ):
            return "weights spread over several devices or not loaded"
        for index, layer in enumerate(lm.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            # Quantized or LoRA-wrapped projections keep their own forward.
            if any(type(m) is not nn.Linear for m in linears):
                return f"layer {index} has projections that are not plain nn.Linear"
            if len({m.weight.dtype for m in linears}) > 1:
                return f"layer {index} has projections of several dtypes"
        return None

    def refresh(self) -> None:
        """(Re)fuses every layer whose parameters are not (any more) views of its fused matrices."""
        if len(self.fused) != len(self.lm.layers):
            self.fused[:] = [None] * len(self.lm.layers)
        for index, layer in enumerate(self.lm.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
            old = self.fused[index]
            if old is None or not (_aliases(qkv, old[0]) and _aliases(gate_up, old[2])):
                self.fused[index] = (*_fuse(qkv), *_fuse(gate_up))

    def __call__(self, tokens, positions, mask, cache):
        lm = self.lm
        hidden = lm.embed_tokens(tokens)
        cos, sin = lm.rotary_emb(hidden, positions)
        batch = tokens.shape[0]
        for index, layer in enumerate(lm.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv_weight, qkv_bias, gate_up_weight, gate_up_bias = self.fused[index]
            heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
            # (B, 1, (H + 2·KV)·hd) → q (B, H, 1, hd), k / v (B, KV, 1, hd)
            qkv = F.linear(layer.input_layernorm(hidden), qkv_weight, qkv_bias).view(batch, 1, -1, attn.head_dim)
            q, k, v = qkv.transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
            q, k = _rotary(attn)(q, k, cos, sin)
            k, v = cache.update(k, v, attn.layer_idx)  # (B, KV, L, hd): the whole static cache
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=kv_heads != heads
            )  # (B, H, 1, hd)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            gate, up = F.linear(layer.post_attention_layernorm(hidden), gate_up_weight, gate_up_bias).chunk(2, -1)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return lm.norm(hidden)


def _fuse(linears):
    """Concatenates the linears' weights (and biases) along the output rows; the linears become views of it."""
    # Normal tensors even when built under inference mode (the server builds its engine there): the model's
    # parameters become views of these and must stay usable outside it.
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start : start + rows]
        if bias is not None:
            m.bias.data = bias[start : start + rows]
        start += rows
    # The compiled step reads these as graph inputs, not module parameters: marked static, the CUDA graph reads them
    # in place instead of copying ~GBs of weights into its own input buffers on every replay.
    for tensor in (weight, bias):
        if tensor is not None:
            torch._dynamo.mark_static_address(tensor)
    return weight, bias


def _aliases(linears, weight) -> bool:
    """Whether the linears' weights are still the consecutive row-slices of `weight`."""
    start, row = weight.data_ptr(), weight.stride(0) * weight.element_size()
    for m in linears:
        if m.weight.data_ptr() != start or m.weight.device != weight.device:
            return False
        start += m.weight.shape[0] * row
    return start == weight.data_ptr() + weight.shape[0] * row


def _rotary(attn):
    """The model's own `apply_rotary_pos_emb`, from the module that defines its attention class."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


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
        fuse: bool = True,
    ):
        attention_backend(attention)  # validates the name before anything compiles
        self.attention = attention
        self.model = model
        self.fused = FusedDecodeStack.build(model.model.language_model) if fuse else None
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
            if self.fused is not None:
                hidden = self.fused(tokens, positions, mask, cache)
            else:
                hidden = lm(
                    input_ids=tokens,
                    position_ids=positions,
                    attention_mask=mask,
                    use_cache=True,
                    **{CACHE_KWARG: cache},
                ).last_hidden_state
        return self.model.lm_head(hidden[:, -1]).argmax(-1)

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
        if self.fused is not None:
            self.fused.refresh()
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
