"""The model side of continuous batching: a fixed pool of slots on one static KV cache, batched prefill into free
slots, and one decode step (compiled and CUDA-graphed on CUDA) for every slot at once.

    slots = SlotDecoder(model, slots=16, max_cache_len=2048)
    logits = slots.prefill([(slot, input_ids, pixel_values), ...], pad_token_id)   # (b, V), last prompt positions
    first = slots.sample(logits, [slot, ...])                                       # (b,) next tokens
    slots.join([slot, ...], first)
    tokens = slots.step()                                                            # (slots,) one token per slot

The engine (`serve/engine.py`) owns the requests; this class owns only tensors.

Cache layout. The cache is a transformers `StaticCache`-style list of `StaticLayer`s of shape
(slots, kv_heads, max_cache_len, head_dim). A decode step writes every slot's new key/value at the same column, the
write pointer `column`, which advances by one each step and wraps around at `max_cache_len` (a ring). A request that
joins while the pointer is at column c gets its prompt's keys/values copied into columns c-P .. c-1 (mod L) of its
own slot, and its generated tokens follow at c, c+1, ...; a per-slot boolean mask over the L columns says which
columns belong to the request now in that slot (keys are stored after the rotary embedding, so the order of columns
does not matter to attention). As long as prompt + new tokens ≤ L the pointer never comes back to a live request's
prompt before the request has ended. Positions (for the rotary embedding) are per slot. Free slots still run through
the step (fixed shapes are what lets the step be one CUDA graph); their mask keeps the current column open so their
arithmetic stays finite, and their output is ignored.

The step runs through `generation.FusedDecodeStack` (q/k/v and gate/up projections fused) where the language model
allows it (Llama family, plain linears on one device), otherwise through the language model's own forward.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

from ..generation import FusedDecodeStack
from ..modeling.modeling_internvl_chat import CACHE_KWARG

logger = logging.getLogger(__name__)


class UnsupportedModel(ValueError):
    """The model cannot run on the slot cache (the engine falls back to one `generate` call per batch)."""


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def check_supported(model, max_cache_len: int) -> None:
    """Raises UnsupportedModel with the reason when the slot cache cannot serve `model`."""
    config = _text_config(model)
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager"):
        raise UnsupportedModel(f"attention implementation {attn!r} (the slot cache needs a 4D mask: sdpa or eager)")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModel(f"layer types {sorted(set(layer_types))} (only full attention is supported)")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < max_cache_len:
        raise UnsupportedModel(f"sliding window {window} shorter than the cache ({max_cache_len} tokens)")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1 and any(d.type == "meta" for d in devices):
        raise UnsupportedModel("offloaded weights (meta device)")


def kv_bytes_per_token(model, slots: int = 1) -> int:
    """Bytes of keys + values that one token of one slot takes in the cache."""
    config = _text_config(model)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = model.get_input_embeddings().weight.dtype  # the cache's dtype (see SlotDecoder)
    element = torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * heads * head_dim * element * slots


class StepResult:
    """The next token of every slot from one step; `tolist()` waits for the step to finish."""

    def __init__(self, tokens: torch.Tensor, event):
        self.tokens = tokens
        self.event = event

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist()


class SlotDecoder:
    """`slots` requests decoding together on one static cache of `max_cache_len` columns; see the module docstring."""

    def __init__(
        self,
        model,
        slots: int,
        max_cache_len: int,
        compile: bool | None = None,
        seed: int | None = None,
        compile_mode: str = "reduce-overhead",
        fuse: bool = True,
    ):
        check_supported(model, max_cache_len)
        self.model = model
        self.slots = slots
        self.length = max_cache_len
        config = _text_config(model)
        self.eager_mask = (getattr(config, "_attn_implementation", None) or "sdpa") == "eager"
        language_model = model.model.language_model
        self.device = language_model.embed_tokens.weight.device
        self.dtype = language_model.embed_tokens.weight.dtype
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Plain full-attention static layers, allocated now (on each decoder layer's own device, which matters under
        # a device map) rather than lazily at the first write.
        layers = []
        for index in range(config.num_hidden_layers):
            layer = StaticLayer(max_cache_len=max_cache_len)
            module = language_model.layers[index]
            device = next(module.parameters()).device
            # The embedding's dtype, not the layer's: a quantized layer's parameters are integers.
            empty = torch.empty(slots, heads, 0, head_dim, dtype=self.dtype, device=device)
            layer.lazy_initialization(empty, empty)
            layers.append(layer)
        self.cache = Cache(layers=layers)
        self.column = 0  # the write pointer: every layer's `cumulative_length`
        device = self.device
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        # 1 for slots holding a request: free slots keep position 0 (rotary variants that look at the largest
        # position in the batch must see only real ones).
        self.occupied = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(slots, 1, 1, max_cache_len, dtype=torch.bool, device=device)
        self.temperature = torch.ones(slots, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.do_sample = torch.zeros(slots, dtype=torch.bool, device=device)
        self.sampling_slots: set[int] = set()
        self.generator = None
        # Two pinned host buffers for the tokens of the step in flight and of the one being read.
        pinned = device.type == "cuda"
        self._host_buffers = [torch.empty(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._host_index = 0
        if seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        distributed = len({p.device for p in model.parameters()}) > 1
        quantized = getattr(model, "hf_quantizer", None) is not None
        use_compile = (device.type == "cuda" and not distributed and not quantized) if compile is None else compile
        self.compiled = use_compile
        # Fused q/k/v and gate/up projections in the step (`generation.FusedDecodeStack`; None where not fusable).
        self.fused = FusedDecodeStack.build(language_model) if fuse else None
        # [IMPORTANT] "reduce-overhead" captures the step as a CUDA graph: every shape is fixed (slots, cache length)
        # and the cache tensors keep their addresses (StaticLayer marks them static).
        self._step = torch.compile(self._forward, mode=compile_mode) if use_compile else self._forward

    # -- the decode step ----------------------------------------------------------------------------------------------
    def _forward(self, tokens, positions, mask):
        """tokens (S, 1), positions (S, 1), mask (S, 1, 1, L) bool → logits (S, V) of the one new position."""
        if self.fused is not None:  # SDPA with the boolean mask, whatever the model's attention implementation
            return self.model.lm_head(self.fused(tokens, positions, mask, self.cache)[:, -1])
        if self.eager_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        lm = self.model.model.language_model
        out = lm(
            input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **{CACHE_KWARG: self.cache}
        )
        return self.model.lm_head(out.last_hidden_state[:, -1])

    def _set_column(self, column: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(column)
        self.column = column

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step for every slot: feeds each slot's current token, returns the next ones (S,) on device."""
        if self.column >= self.length:
            self._set_column(0)
        self.mask[:, :, :, self.column] = True
        logits = self._step(self.tokens, self.positions, self.mask)
        next_tokens = self.sample(logits, None)
        self.column += 1
        self.positions += self.occupied
        self.tokens.copy_(next_tokens[:, None])
        return next_tokens

    def step_async(self) -> StepResult:
        """`step`, with the tokens' copy to the host started but not awaited: the caller can do host work (streaming
        the previous step's text) while the GPU runs this step."""
        tokens = self.step()
        if tokens.device.type != "cuda":
            return StepResult(tokens, None)
        host = self._host_buffers[self._host_index]
        self._host_index ^= 1
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepResult(host, event)

    def warm_up(self, steps: int = 3) -> None:
        """Compiles and records the step graph (all slots free) so the first request does not pay for it."""
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- sampling -----------------------------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, slots: list[int] | None) -> torch.Tensor:
        """Next token per row of `logits` (R, V): greedy, or temperature + top-p sampling (transformers' warpers, in
        that order) for rows whose slot samples. `slots` names the slot of each row (None: row i is slot i)."""
        greedy = logits.argmax(-1)
        rows = range(logits.shape[0]) if slots is None else slots
        if not any(s in self.sampling_slots for s in rows):
            return greedy
        index = None if slots is None else torch.tensor(slots, device=logits.device)
        pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
        temperature, top_p, do_sample = pick(self.temperature), pick(self.top_p), pick(self.do_sample)
        scores = logits.float() / temperature[:, None]
        sorted_scores, order = scores.sort(-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p[:, None])
        remove[:, -1] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        sampled = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]
        return torch.where(do_sample, sampled, greedy)

    def set_sampling(self, slot: int, temperature: float, top_p: float) -> None:
        """Greedy when temperature == 0; must be called before the slot's first `sample`."""
        if temperature > 0:
            self.sampling_slots.add(slot)
            self.temperature[slot] = temperature
            self.top_p[slot] = top_p
            self.do_sample[slot] = True
        else:
            self.sampling_slots.discard(slot)
            self.do_sample[slot] = False

    # -- joining and leaving ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: list[tuple[int, list[int], torch.Tensor | None]], pad_token_id: int) -> torch.Tensor:
        """Runs the prompts of `rows` ((slot, input_ids, pixel_values or None), slots free) as one left-padded batch
        through the full model (vision tower included) and copies each prompt's keys/values into its slot.
        Returns the logits (b, V) of each prompt's last position."""
        width = max(len(ids) for _, ids, _ in rows)
        if width >= self.length:
            raise ValueError(f"a prompt of {width} tokens does not fit the {self.length}-token cache")
        batch = len(rows)
        ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for row, (_, row_ids, _) in enumerate(rows):
            ids[row, width - len(row_ids) :] = torch.tensor(row_ids, dtype=torch.long)
            attention[row, width - len(row_ids) :] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        pixels = [p for _, _, p in rows if p is not None]
        # The model scatters image features into the image tokens in row-major order over the whole batch.
        pixel_values = torch.cat(pixels).to(self.device) if pixels else None
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=_text_config(self.model))
        out = self.model(
            input_ids=ids,
            pixel_values=pixel_values,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        # Flat (row, token) → (slot, column) index pairs for the real (unpadded) tokens of every prompt, built on the
        # device: token t of a row (left-padded to `width`) goes to column (column - width + t) mod L of its slot.
        src_rows, src_tokens = attention.bool().nonzero(as_tuple=True)
        slots = torch.tensor([slot for slot, _, _ in rows], device=self.device)
        dst_slots = slots[src_rows]
        dst_columns = (src_tokens + (self.column - width)) % self.length
        indices = {}
        for layer, static in zip(cache.layers, self.cache.layers):
            device = static.keys.device
            if device not in indices:
                indices[device] = [t.to(device) for t in (src_rows, src_tokens, dst_slots, dst_columns)]
            rows_i, tokens_i, slots_i, columns_i = indices[device]
            # keys (b, H, T, D)[rows, :, tokens] → (N, H, D) into (S, H, L, D)[slots, :, columns]
            static.keys[slots_i, :, columns_i] = layer.keys.to(device)[rows_i, :, tokens_i]
            static.values[slots_i, :, columns_i] = layer.values.to(device)[rows_i, :, tokens_i]
        self.mask[slots] = False
        self.mask[dst_slots, 0, 0, dst_columns] = True
        self.positions[slots, 0] = attention.sum(-1)
        return out.logits[:, -1]

    def join(self, slots: list[int], first_tokens: torch.Tensor) -> None:
        """Makes `first_tokens` (b,) the next input of `slots` (after `prefill`)."""
        index = torch.tensor(slots, device=self.device)
        self.tokens[index, 0] = first_tokens.to(self.device)
        self.occupied[index] = 1

    def release(self, slot: int) -> None:
        self.sampling_slots.discard(slot)
        self.occupied[slot] = 0
        self.positions[slot] = 0
