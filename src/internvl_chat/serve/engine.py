"""Streaming, continuously batched generation shared by `chat`, `serve` and `web`.

    from internvl_chat.serve.engine import Engine, SamplingParams
    engine = Engine(model, processor, max_batch_size=16, batch_window=0.01, max_queue=64).start()
    prepared = engine.prepare(messages, images)              # validation errors: InvalidRequest (→ HTTP 400)
    for delta in engine.submit(prepared, SamplingParams(max_new_tokens=64)).stream():
        print(delta, end="", flush=True)
    engine.stop()

One worker thread owns the model. Requests are tokenized and their images preprocessed by the caller (`prepare`,
any thread), then queued. Two schedulers:

- `scheduler="continuous"` (default): a fixed pool of `max_batch_size` slots on one static KV cache
  (`serve/batching.py`). Between decoding steps, waiting requests join free slots (their prompts run as one batched
  prefill, at most `max_prefill_tokens` padded tokens per step, whose keys/values are copied into the slots) and
  finished ones leave; each step then decodes one token for every slot in one call (compiled and CUDA-graphed on
  CUDA). Sampling (greedy, temperature, top-p) is per request, so requests with different settings share steps.
  While requests still wait for free slots (a burst), their prefill goes before the next step (time to first token);
  a step's tokens are streamed while the next step runs (host work overlaps the GPU).
- `scheduler="window"`: the worker takes the oldest request, waits `batch_window` seconds for more with the same
  sampling settings, left-pads them into one batch and runs one `model.generate` call; a request arriving while a
  batch runs waits for the next one. Used for models the slot cache cannot serve (flash-attention, sliding-window
  layers shorter than the cache): the continuous engine falls back to it with a warning.

Either way a per-row decoder (`_RowDecoder`) turns each new token into streamed text and ends the row on EOS, a stop
string, its own token limit, its deadline or its client going away. Over capacity (`max_queue` requests waiting),
`submit` raises `Overloaded` at once: callers answer 503 instead of letting clients time out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .batching import SlotDecoder, UnsupportedModel, check_supported, kv_bytes_per_token

logger = logging.getLogger(__name__)

SCHEDULERS = ("continuous", "window")
DEFAULT_MAX_CACHE_LEN = 4096


class EngineError(Exception):
    """Base of the engine's request errors; `status` is the HTTP status the server answers with."""

    status = 500
    code = "internal_error"
    type = "server_error"


class InvalidRequest(EngineError, ValueError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ImageTooLarge(InvalidRequest):
    code = "image_too_large"


class Overloaded(EngineError):
    status = 503
    code = "server_overloaded"
    type = "server_error"


class RequestTimeout(EngineError):
    status = 504
    code = "timeout"
    type = "server_error"


class Cancelled(EngineError):
    status = 499
    code = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call (one logits-processor setting per call)."""
        return (True, self.temperature, self.top_p) if self.do_sample else (False,)


@dataclass
class Prepared:
    """A tokenized prompt and its preprocessed images, ready to be queued."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    num_images: int


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: Exception


class RequestHandle:
    """One queued request: its event channel (sync or asyncio) and its cancellation flag."""

    _ids = itertools.count()

    def __init__(self, prepared: Prepared, params: SamplingParams, deadline: float, loop=None):
        self.id = next(self._ids)
        self.prepared = prepared
        self.params = params
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._on_cancel = None
        self.result: Finished | None = None
        self.ended = False  # set by the engine once it pushed Finished / Failed
        self.first_token_at: float | None = None  # time.monotonic() when its first token was generated

    # -- engine side ------------------------------------------------------------------------------------------------
    def _push(self, event) -> None:
        if isinstance(event, (Finished, Failed)):
            self.ended = True
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled.set()

    # -- caller side ------------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Frees the request's slot: dropped from the queue, or its row stops at the next decoding step. Safe from any
        thread: a consumer blocked in `stream()` / `astream()` wakes up with `Cancelled`."""
        if not self.cancelled.is_set() and not self.ended:
            self.cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel(self)
            self._push(Failed(Cancelled("The request was cancelled.")))

    def _handle(self, event):
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            self.result = event
        return event

    def stream(self) -> Iterator[str]:
        """Yields text deltas (blocking); afterwards `self.result` holds the `Finished` event."""
        try:
            while True:
                remaining = self.deadline - time.monotonic() + 1.0
                try:
                    event = self._handle(self._events.get(timeout=max(remaining, 0.01)))
                except queue.Empty:
                    raise RequestTimeout("The request timed out.") from None
                if isinstance(event, Finished):
                    return
                yield event.text
        finally:
            if self.result is None:
                self.cancel()

    async def astream(self) -> AsyncIterator[str]:
        """Async `stream`; the handle must have been submitted with `loop=`. Cancels the request when abandoned."""
        try:
            while True:
                # The engine enforces the deadline between decoding steps; the extra second covers a step that
                # is itself slow (a long prefill) so the client still gets an answer.
                remaining = self.deadline - time.monotonic() + 1.0
                try:
                    event = self._handle(await asyncio.wait_for(self._events.get(), max(remaining, 0.01)))
                except asyncio.TimeoutError:
                    raise RequestTimeout("The request timed out.") from None
                if isinstance(event, Finished):
                    return
                yield event.text
        finally:
            if self.result is None:
                self.cancel()

    def text(self) -> Finished:
        """Blocks until the request is finished and returns its `Finished` event."""
        for _ in self.stream():
            pass
        return self.result

    async def atext(self) -> Finished:
        async for _ in self.astream():
            pass
        return self.result


class _RowDecoder:
    """Incremental detokenization of one batch row, with stop strings and held-back text.

    Text is emitted only once it can no longer change: a trailing partial UTF-8 character (U+FFFD), a suffix
    that may be the start of a stop string, and trailing whitespace (the final answer is stripped, as
    `post_process_image_text_to_text` does) are held back until the next token decides.
    """

    def __init__(self, handle: RequestHandle, tokenizer, eos_ids: set[int], stop_strings: Sequence[str]):
        self.handle = handle
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stops = [s for s in stop_strings if s]
        self.tokens: list[int] = []
        self.emitted = ""
        self.done = False
        self.eos_seen = False  # OpenAI counts a generated EOS as a completion token; `tokens` holds decoded ones

    def _safe_end(self, text: str) -> int:
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return len(text[:end].rstrip())

    def add(self, token: int) -> str | None:
        """Consumes one generated token; returns a finish reason when the row has ended, else None."""
        params = self.handle.params
        if self.handle.first_token_at is None:
            self.handle.first_token_at = time.monotonic()
        if token in self.eos_ids:
            self.eos_seen = True
            return self._finish("stop")
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        for stop in self.stops:
            index = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if index >= 0:
                return self._finish("stop", text[:index])
        if len(self.tokens) >= params.max_new_tokens:
            return self._finish("length", text)
        end = self._safe_end(text)
        if end > len(self.emitted) and text.startswith(self.emitted):
            self.handle._push(Delta(text[len(self.emitted) : end]))
            self.emitted = text[:end]
        return None

    def _finish(self, reason: str, text: str | None = None) -> str:
        if text is None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip() if self.tokens else ""
        text = text.rstrip()
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.handle._push(Delta(text[len(self.emitted) :]))
            self.emitted = text
        self.done = True
        self.handle._push(
            Finished(
                text=self.emitted,
                finish_reason=reason,
                prompt_tokens=len(self.handle.prepared.input_ids),
                completion_tokens=len(self.tokens) + int(self.eos_seen),
            )
        )
        return reason


class _BatchCriteria(StoppingCriteria):
    """Streams each row's new token and stops rows independently (a per-row bool tensor, as transformers allows).

    # [IMPORTANT] transformers calls stopping criteria with the full `input_ids` right after appending the step's
    # tokens (and before handing them to a `streamer`, in 5.x): decoding here keeps the order right whatever the
    # streamer timing is, and lets a row end on the very token that completed a stop string.
    """

    def __init__(self, decoders: list[_RowDecoder], prompt_length: int, on_row_done):
        self.decoders = decoders
        self.prompt_length = prompt_length
        self.on_row_done = on_row_done
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        new_tokens = input_ids[:, -1].tolist()
        now = time.monotonic()
        flags = []
        for decoder, token in zip(self.decoders, new_tokens):
            if not decoder.done:
                handle = decoder.handle
                if handle.cancelled.is_set():
                    decoder.done = True
                    self.on_row_done(decoder, "cancelled")
                elif now > handle.deadline:
                    decoder.done = True
                    handle._push(Failed(RequestTimeout("The request timed out during generation.")))
                    self.on_row_done(decoder, "timeout")
                else:
                    reason = decoder.add(token)
                    if reason is not None:
                        self.on_row_done(decoder, reason)
            flags.append(decoder.done)
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


@dataclass
class EngineStats:
    submitted: int = 0
    completed: int = 0
    rejected: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    batches: int = 0
    batched_rows: int = 0
    max_batch_seen: int = 0
    completion_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    """Owns the model; see the module docstring.

    Args:
        model / processor: an `InternVLChatForConditionalGeneration` and its `InternVLChatProcessor`.
        max_batch_size: most requests decoding at once (slots; 1 = one request at a time).
        batch_window: seconds to wait for more requests after the first one arrived at an idle engine (so that a
            burst shares one prefill / one `generate` call).
        max_queue: most requests waiting (not yet running); beyond it `submit` raises `Overloaded`.
        request_timeout: seconds from submission until a request fails with `RequestTimeout`.
        max_context: most prompt + new tokens (default: the LLM's `max_position_embeddings`; with the continuous
            scheduler also at most `max_cache_len`).
        scheduler: "continuous" (slots on a static cache) or "window" (one `generate` call per batch).
        max_cache_len: tokens per slot of the continuous scheduler's cache (default: min(max_context, 4096), and on
            CUDA at most what fits in half of the free memory).
        max_prefill_tokens: most padded prompt tokens prefilled in one step (bounds the stall of running requests
            and the prefill's memory; a single longer prompt still runs alone).
        seed: seeds the continuous scheduler's sampling generator (reproducible sampling for one arrival order).
        compile: compile + CUDA-graph the decode step (default: on CUDA, one device, not quantized).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 16,
        batch_window: float = 0.01,
        max_queue: int = 64,
        request_timeout: float = 300.0,
        max_context: int | None = None,
        scheduler: str = "continuous",
        max_cache_len: int | None = None,
        max_prefill_tokens: int = 8192,
        seed: int | None = None,
        compile: bool | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, not {scheduler!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        text_config = getattr(model.config, "text_config", model.config)
        self.max_context = max_context or getattr(text_config, "max_position_embeddings", None) or 4096
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        self.eos_ids = set(eos)
        pad = model.generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.tokenizer.pad_token_id or (eos[0] if eos else 0))
        self.stop_strings = list(getattr(processor, "stop_strings", []) or [])
        self.max_prefill_tokens = max_prefill_tokens
        self.cache_limited = False
        self.slots: SlotDecoder | None = None
        if scheduler == "continuous":
            try:
                self.slots = self._build_slots(max_cache_len, compile, seed)
            except UnsupportedModel as err:
                logger.warning("continuous batching is not available for this model (%s): using --engine window", err)
                scheduler = "window"
        self.scheduler = scheduler
        self.stats = EngineStats()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._active: set[int] = set()  # ids of requests in the running batch that have not ended
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _build_slots(self, max_cache_len: int | None, compile: bool | None, seed: int | None) -> SlotDecoder:
        length = max_cache_len or min(self.max_context, DEFAULT_MAX_CACHE_LEN)
        check_supported(self.model, length)
        device = next(self.model.parameters()).device
        if max_cache_len is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            fits = int(0.5 * free) // kv_bytes_per_token(self.model, self.max_batch_size)
            if fits < length:
                length = max(256, fits // 256 * 256)
                logger.warning(
                    "KV cache limited to %d tokens per request by GPU memory (%d slots); see --max-cache-len and "
                    "--max-batch-size",
                    length,
                    self.max_batch_size,
                )
        if length < self.max_context:
            self.max_context = length
            self.cache_limited = True
        try:
            return SlotDecoder(self.model, self.max_batch_size, length, compile=compile, seed=seed)
        except torch.OutOfMemoryError as err:
            raise ValueError(
                f"The KV cache of {self.max_batch_size} slots x {length} tokens does not fit in memory; lower "
                "--max-batch-size or --max-cache-len"
            ) from err

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="internvl-chat-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            waiting = list(self._pending)
            self._pending.clear()
            self._lock.notify_all()
        for handle in waiting:
            handle._push(Failed(Overloaded("The server is shutting down.")))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        with self._lock:
            return {
                "queued": len(self._pending),
                "running": len(self._active),
                "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue,
                "scheduler": self.scheduler,
                **{k: v for k, v in vars(self.stats).items() if k != "extra"},
            }

    # -- request side -------------------------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], images: Sequence = (), image_aspect_ratio: str | None = None) -> Prepared:
        """Renders the chat template and preprocesses `images` (PIL, in placeholder order). Raises InvalidRequest."""
        images = list(images)
        try:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja raise_exception / TemplateError: the message says what is wrong
            raise InvalidRequest(f"Could not apply the chat template: {err}") from err
        kwargs = {"image_aspect_ratio": image_aspect_ratio} if image_aspect_ratio else {}
        try:
            encoding = self.processor(
                images=[images] if images else None, text=[prompt], return_tensors="pt", **kwargs
            )
        except ValueError as err:  # placeholder / image count mismatch, unloadable image, bad mode
            from ..data.images import ImageTooLargeError

            raise (ImageTooLarge if isinstance(err, ImageTooLargeError) else InvalidRequest)(str(err)) from err
        input_ids = encoding["input_ids"][0].tolist()
        return Prepared(input_ids=input_ids, pixel_values=encoding.get("pixel_values"), num_images=len(images))

    def submit(self, prepared: Prepared, params: SamplingParams, loop=None) -> RequestHandle:
        """Queues a request. Raises InvalidRequest (limits) or Overloaded (queue full) at once."""
        if params.max_new_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1.")
        total = len(prepared.input_ids) + params.max_new_tokens
        if total > self.max_context:
            limit = (
                f"This server's context per request is {self.max_context} tokens (its KV cache, --max-cache-len)"
                if self.cache_limited
                else f"This model's maximum context length is {self.max_context} tokens"
            )
            raise ContextLengthExceeded(
                f"{limit}; the request needs "
                f"{len(prepared.input_ids)} prompt tokens + {params.max_new_tokens} max_tokens = {total}. "
                "Reduce the length of the messages, the number of images or max_tokens."
            )
        handle = RequestHandle(prepared, params, time.monotonic() + self.request_timeout, loop=loop)
        handle._on_cancel = self._on_cancel
        with self._lock:
            if self._stopping or self._thread is None:
                raise Overloaded("The engine is not running.")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(f"The server is at capacity ({self.max_queue} requests waiting); retry shortly.")
            self._pending.append(handle)
            self.stats.submitted += 1
            self._lock.notify_all()
        return handle

    def _on_cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self.stats.cancelled += 1
            self._active.discard(handle.id)
            with contextlib.suppress(ValueError):
                self._pending.remove(handle)
                logger.debug("request %d cancelled while queued", handle.id)

    def generate(
        self, messages: list[dict], images: Sequence = (), params: SamplingParams | None = None, **prepare_kwargs
    ) -> Iterator[str]:
        """Convenience for in-process callers (terminal chat, web UI): prepare + submit + stream."""
        handle = self.submit(self.prepare(messages, images, **prepare_kwargs), params or SamplingParams())
        yield from handle.stream()

    # -- worker side --------------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[RequestHandle] | None:
        with self._lock:
            while not self._pending and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            first_arrival = self._pending[0].submitted
            # Wait (at most `batch_window` after the oldest request arrived) for the batch to fill up.
            while len(self._pending) < self.max_batch_size and not self._stopping:
                remaining = first_arrival + self.batch_window - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            if not self._pending:
                return []
            key = self._pending[0].params.batch_key()
            batch, rest = [], collections.deque()
            while self._pending:
                handle = self._pending.popleft()
                if len(batch) < self.max_batch_size and handle.params.batch_key() == key:
                    batch.append(handle)
                else:
                    rest.append(handle)
            self._pending = rest
            self._active = {h.id for h in batch}
            return batch

    def _worker(self) -> None:
        if self.scheduler == "continuous":
            self._continuous_worker()
        else:
            self._window_worker()

    def _window_worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for handle in batch:
                if handle.cancelled.is_set():
                    continue
                if now > handle.deadline:
                    self.stats.timed_out += 1
                    handle._push(Failed(RequestTimeout("The request timed out while queued.")))
                    continue
                live.append(handle)
            with self._lock:
                self._active = {h.id for h in live if not h.cancelled.is_set()}
            if live:
                try:
                    self._run_batch(live)
                except Exception as err:  # the worker must survive anything a batch does
                    logger.exception("generation failed for a batch of %d", len(live))
                    self.stats.failed += len(live)
                    for handle in live:
                        handle._push(Failed(EngineError(f"Generation failed: {type(err).__name__}: {err}")))
            with self._lock:
                self._active.clear()

    def _collate(self, batch: list[RequestHandle]) -> dict:
        """Left-pads the prompts (as the processor does with `padding=True`) and stacks the images in row order."""
        width = max(len(h.prepared.input_ids) for h in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, handle in enumerate(batch):
            row_ids = handle.prepared.input_ids
            ids[row, width - len(row_ids) :] = torch.tensor(row_ids, dtype=torch.long)
            mask[row, width - len(row_ids) :] = 1
        device = self.model.device
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        pixels = [h.prepared.pixel_values for h in batch if h.prepared.pixel_values is not None]
        if pixels:
            # The model scatters image features into the image tokens in row-major order over the whole batch,
            # so concatenating each row's images in row order lines them up.
            inputs["pixel_values"] = torch.cat(pixels).to(device)
        return inputs

    def _run_batch(self, batch: list[RequestHandle]) -> None:
        params = batch[0].params
        decoders = [
            _RowDecoder(h, self.tokenizer, self.eos_ids, self.stop_strings + list(h.params.stop)) for h in batch
        ]

        def on_row_done(decoder: _RowDecoder, reason: str) -> None:
            with self._lock:
                self._active.discard(decoder.handle.id)
            if reason in ("stop", "length"):
                self.stats.completed += 1
                self.stats.completion_tokens += len(decoder.tokens)
            elif reason == "timeout":
                self.stats.timed_out += 1

        inputs = self._collate(batch)
        criteria = _BatchCriteria(decoders, inputs["input_ids"].shape[1], on_row_done)
        gen_kwargs = dict(
            max_new_tokens=max(h.params.max_new_tokens for h in batch),
            do_sample=params.do_sample,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_ids) or None,
            stopping_criteria=StoppingCriteriaList([criteria]),
        )
        if params.do_sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        self.stats.batches += 1
        self.stats.batched_rows += len(batch)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        started = time.monotonic()
        with torch.inference_mode():
            self.model.generate(**inputs, **gen_kwargs)
        logger.debug("batch of %d: %d steps in %.3fs", len(batch), criteria.steps, time.monotonic() - started)
        # Rows that generate ended without our criteria seeing their end (max_new_tokens of the call reached
        # before their own limit cannot happen, but a model-side stop could): close them so no client hangs.
        for decoder in decoders:
            if not decoder.done:
                if decoder.handle.cancelled.is_set():
                    decoder.done = True
                else:
                    on_row_done(decoder, decoder._finish("length"))

    # -- continuous scheduler ---------------------------------------------------------------------------------------
    def _admit(self, free: int, busy: bool) -> list[RequestHandle] | None:
        """Takes up to `free` waiting requests (None when stopping). Blocks while the engine is idle; an idle engine
        waits `batch_window` after the first arrival so that a burst shares one prefill."""
        with self._lock:
            if not busy:
                while not self._pending and not self._stopping:
                    self._lock.wait()
            if self._stopping:
                return None
            if not free or not self._pending:
                return []
            if not busy:
                first_arrival = self._pending[0].submitted
                while len(self._pending) < free and not self._stopping:
                    remaining = first_arrival + self.batch_window - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                if self._stopping:
                    return None
            taken: list[RequestHandle] = []
            width = 0
            while self._pending and len(taken) < free:
                width = max(width, len(self._pending[0].prepared.input_ids))
                if taken and width * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                taken.append(self._pending.popleft())
            self._active.update(h.id for h in taken)
            return taken

    def _continuous_worker(self) -> None:
        slots = self.slots
        if slots.compiled:
            try:
                slots.warm_up()
            except Exception:  # a compiler failure must not take the server down: decode eagerly instead
                logger.exception("compiling the decode step failed; decoding without compile")
                slots._step = slots._forward
                slots.compiled = False
        free = list(range(self.max_batch_size - 1, -1, -1))  # free slots (a stack)
        running: dict[int, _RowDecoder] = {}
        # The step in flight and the requests it decodes for. Its tokens are read (and streamed) after the next step
        # was launched, so the host's work overlaps the GPU's; a request that ended meanwhile ignores its extra token.
        in_flight = None
        while True:
            joining = self._admit(len(free), bool(running) or in_flight is not None)
            if joining is None:
                for decoder in running.values():
                    decoder.handle._push(Failed(Overloaded("The server is shutting down.")))
                return
            now = time.monotonic()
            live = []
            for handle in joining:
                if handle.cancelled.is_set():
                    continue
                if now > handle.deadline:
                    self.stats.timed_out += 1
                    handle._push(Failed(RequestTimeout("The request timed out while queued.")))
                    self._end(handle)
                    continue
                live.append(handle)
            if live:
                assigned = [(free.pop(), handle) for handle in live]
                try:
                    self._join(assigned, running, free)
                except Exception as err:  # the worker must survive anything a prefill does
                    logger.exception("prefill failed for %d requests", len(assigned))
                    self._fail([(slot, running.pop(slot, None) or handle) for slot, handle in assigned], err, free)
            launched = None
            try:
                # Prefill first: while requests still wait for free slots (a burst), their prefill goes before the next
                # decoding step, so time to first token is not stretched by steps of the requests already running.
                if running and not (free and self._pending):
                    launched = (slots.step_async(), list(running.items()))
                    self.stats.extra["steps"] = self.stats.extra.get("steps", 0) + 1
                if in_flight is not None:
                    result, rows = in_flight
                    tokens = result.tolist()
                    for slot, decoder in rows:
                        if running.get(slot) is decoder:  # still decoding (not ended at the step before)
                            self._feed(slot, decoder, tokens[slot], running, free)
            except Exception as err:
                logger.exception("decoding step failed for %d requests", len(running))
                self._fail(list(running.items()), err, free)
                running.clear()
                launched = None
            in_flight = launched

    def _join(self, assigned: list[tuple[int, RequestHandle]], running: dict, free: list[int]) -> None:
        slots = self.slots
        for slot, handle in assigned:
            slots.set_sampling(slot, handle.params.temperature, handle.params.top_p)
        rows = [(slot, h.prepared.input_ids, h.prepared.pixel_values) for slot, h in assigned]
        logits = slots.prefill(rows, self.pad_token_id)
        first = slots.sample(logits, [slot for slot, _ in assigned])
        slots.join([slot for slot, _ in assigned], first)
        self.stats.batches += 1
        self.stats.batched_rows += len(assigned)
        for slot, handle in assigned:
            running[slot] = _RowDecoder(
                handle, self.tokenizer, self.eos_ids, self.stop_strings + list(handle.params.stop)
            )
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(running))
        for (slot, _), token in zip(assigned, first.tolist()):
            self._feed(slot, running[slot], token, running, free)

    def _feed(self, slot: int, decoder: _RowDecoder, token: int, running: dict, free: list[int]) -> None:
        """One new token for the request in `slot`; frees the slot when the request ended (as `_BatchCriteria`)."""
        handle = decoder.handle
        if handle.cancelled.is_set():
            reason = "cancelled"
        elif time.monotonic() > handle.deadline:
            handle._push(Failed(RequestTimeout("The request timed out during generation.")))
            self.stats.timed_out += 1
            reason = "timeout"
        else:
            reason = decoder.add(token)
            if reason is None:
                return
            self.stats.completed += 1
            self.stats.completion_tokens += len(decoder.tokens)
        decoder.done = True
        del running[slot]
        self.slots.release(slot)
        free.append(slot)
        self._end(handle)
        logger.debug("request %d left slot %d (%s)", handle.id, slot, reason)

    def _end(self, handle: RequestHandle) -> None:
        with self._lock:
            self._active.discard(handle.id)

    def _fail(self, rows: list[tuple[int, object]], err: Exception, free: list[int]) -> None:
        for slot, item in rows:
            handle = item.handle if isinstance(item, _RowDecoder) else item
            if not handle.ended:
                self.stats.failed += 1
                handle._push(Failed(EngineError(f"Generation failed: {type(err).__name__}: {err}")))
            self.slots.release(slot)
            if slot not in free:
                free.append(slot)
            self._end(handle)
