"""Batched, resumable, deterministic generation for the benchmarks.

    from internvl_chat.eval.runner import load_model, generate_predictions
    model, processor = load_model("out/llava-7b")
    preds, stats = generate_predictions(model, processor, samples, "out/eval/textvqa/predictions.jsonl",
                                        batch_size=16, max_new_tokens=128)

* **Batches**: questions are sorted by prompt length (longest first, ties in file order) and cut into batches, so
  padding is small; prompts are left-padded (the core model's batched ``generate`` equals one-by-one).
* **Prefetch**: every image is decoded and preprocessed in its own thread-pool task (``processor.image_processor``
  per image), and a batch's prompts are tokenized as one call, for the next ``prefetch`` batches while the model
  generates the current one; the assembled inputs equal ``processor(images=..., text=..., padding=True,
  padding_side="left")`` of the whole batch.
* **Fast decoding** (``fast_decode=True``, ``internvl-chat eval --fast-decode``): greedy decoding through
  `internvl_chat.generation.FastGreedyDecoder` (static cache, compiled decode step on CUDA) instead of
  ``model.generate``; one decoder per model is built and reused across runs, and a short last batch is filled up
  to the batch size so the compiled step keeps one shape. Same answers as ``model.generate`` in
  exact arithmetic (tested on CPU); on a GPU in fp16 a near-tie between two logits can flip a token, so it is off by
  default (published-protocol runs use ``model.generate``).
* **Timings**: the returned stats split the time into waiting for prepared inputs, host→device copies,
  prefill + generation (GPU-synchronised) and detokenizing + writing, so a benchmark can show where time goes.
* **Resumable**: each finished batch is appended to ``predictions.jsonl`` (LLaVA's answer-file fields:
  ``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``, so LLaVA's review scripts read
  it) and flushed; a rerun skips the ids already
  there (a line cut by a crash is dropped). When every question is answered the file is rewritten in question-file
  order, so an interrupted-then-resumed run and a straight run give the same file.
* **Data-parallel** (``torchrun`` / ``accelerate launch``): the unanswered questions are dealt round-robin over the
  processes, each length-sorts and batches its own share and appends to ``predictions.jsonl.rankN``; after a
  barrier the main process merges everything in question-file order (`internvl_chat.data.sharding`), so the file
  is the one a single process writes. A resumed run reads every part, whatever number of processes wrote it.
* **Deterministic**: greedy decoding (``do_sample=False, num_beams=1``), fixed seed, length-sorted order
  independent of the batch size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from ..data.images import load_image as decode_image
from ..data.sharding import Ranks, ShardedJsonl, launch_state, ordered_by, shard
from .tasks import Sample

logger = logging.getLogger(__name__)


def load_model(
    model_dir: str,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
):
    """`internvl_chat.loading.load_model` with the evaluation defaults: fp16 on CUDA (LLaVA's eval dtype),
    fp32 on CPU; ``trust_remote_code`` as there (folders of another model type only)."""
    from ..loading import load_model as _load

    return _load(
        model_dir,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        cuda_auto_dtype="float16",
        trust_remote_code=trust_remote_code,
    )


def answer_id(model_id: str, key: str, text: str) -> str:
    """A 22-character id of one answer (LLaVA's answer files carry a random shortuuid; ours is a hash of model,
    question key and answer, so a rerun writes the same file)."""
    return hashlib.sha256(f"{model_id}\0{key}\0{text}".encode()).hexdigest()[:22]


def build_prompt(processor, sample: Sample, template: str | None = None, system: str | None = None) -> str:
    """The full model prompt of one question through the model's chat template (or ``template``, a registered
    template name): user turn = image + ``sample.prompt``, then the generation prompt (``ASSISTANT:``...)."""
    content = ([{"type": "image"}] if sample.image is not None else []) + [{"type": "text", "text": sample.prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if template is not None:
        from ..templates import render_chat

        return render_chat(messages, template, add_generation_prompt=True)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prediction_key(record: dict) -> str:
    """The question key of a ``predictions.jsonl`` line (``key`` when the task sets one, else ``question_id``)."""
    return str(record.get("key", record["question_id"]))


def prediction_store(path: str | os.PathLike, ranks: Ranks | None = None) -> ShardedJsonl:
    """The append-only ``predictions.jsonl`` of one task (plus ``.rankN`` parts while several processes write)."""
    return ShardedJsonl(path, prediction_key, ranks)


def _prompt_length(processor, prompt: str, has_image: bool) -> int:
    n = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return n + (getattr(processor, "image_seq_length", 0) if has_image else 0)


# Timing keys of the stats (seconds, summed over batches); see `generate_predictions`.
TIMING_KEYS = (
    "wait_seconds",
    "first_wait_seconds",
    "transfer_seconds",
    "generate_seconds",
    "postprocess_seconds",
    "loop_seconds",
    "prepare_cpu_seconds",
)


def generate_predictions(
    model,
    processor,
    samples: Sequence[Sample],
    output_file: str | os.PathLike,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    num_workers: int = 4,
    prefetch: int = 2,
    template: str | None = None,
    system: str | None = None,
    model_id: str | None = None,
    desc: str = "eval",
    seed: int = 0,
    fast_decode: bool = False,
    ranks: Ranks | None = None,
) -> tuple[dict[str, str], dict]:
    """Generates the missing answers of ``samples`` into ``output_file``; returns ({key: text}, speed stats).

    ``fast_decode``: greedy decoding through `FastGreedyDecoder` instead of ``model.generate`` (see the module
    docstring); it falls back to ``model.generate`` (with a warning) when the model's generation config sets
    something the decoder does not apply (repetition penalty, minimum length...).

    Stats: ``questions``, ``batch_size``, ``seconds`` (prefill + generation, GPU-synchronised, summed over batches)
    and ``questions_per_second`` (questions / seconds), plus ``fast_decode`` (whether it was used), ``batches`` and
    the breakdown of the batch loop: ``wait_seconds`` (blocked on prepared inputs; ``first_wait_seconds`` of it for
    the first batch, i.e. filling the pipeline), ``transfer_seconds`` (host→device copies), ``generate_seconds``
    (= ``seconds``; with fast decoding the first batch includes compiling the decode step), ``postprocess_seconds``
    (detokenize + append to the file), ``loop_seconds`` (wall time of the whole loop) and ``prepare_cpu_seconds``
    (image decoding + preprocessing + tokenization summed over the worker threads; near ``loop_seconds`` ×
    ``num_workers`` means the workers, not the model, set the pace).
    """
    device = next(model.parameters()).device
    ranks = ranks or launch_state("cpu" if device.type == "cpu" else None)
    store = prediction_store(output_file, ranks)
    done = store.read()
    pending = [s for s in samples if s.key not in done]
    # Round-robin share of what is left (data.sharding); the length sort below then orders this share only.
    todo = shard(pending, ranks.rank, ranks.world_size)
    # [IMPORTANT] every process has read the files (and agreed on `pending`) before any of them appends.
    ranks.barrier()
    stats = {"questions": len(todo), "seconds": 0.0, "questions_per_second": None, "batch_size": batch_size}
    stats.update({"fast_decode": False, "batches": 0, **dict.fromkeys(TIMING_KEYS, 0.0)})
    if todo:
        logger.info(
            "%s: %d questions to answer (%d already in %s%s)",
            desc,
            len(todo),
            len(samples) - len(pending),
            output_file,
            f"; process {ranks.rank} of {ranks.world_size}" if ranks.world_size > 1 else "",
        )
        prompts = {s.key: build_prompt(processor, s, template, system) for s in todo}
        lengths = {s.key: _prompt_length(processor, prompts[s.key], s.image is not None) for s in todo}
        # Longest first: the peak-memory batch comes first (fail fast); `sorted` is stable, so ties keep file order.
        ordered = sorted(todo, key=lambda s: -lengths[s.key])
        batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        model_id = model_id or getattr(model.config, "_name_or_path", "") or "model"
        decoder = None
        if fast_decode:
            blockers = _fast_decode_blockers(model)
            if blockers:
                logger.warning("%s: fast decoding off, using model.generate (%s)", desc, "; ".join(blockers))
            else:
                # `lengths` estimates (the `<image>` token and BOS may differ by a token or two): a few tokens of
                # slack; a batch that still does not fit gets a larger decoder in `_run_batches`.
                decoder = _fast_decoder(model, batch_size, max(lengths.values()) + max_new_tokens + 8)
        timings = _run_batches(
            model,
            processor,
            batches,
            prompts,
            store,
            max_new_tokens=max_new_tokens,
            num_workers=num_workers,
            prefetch=prefetch,
            model_id=model_id,
            desc=desc,
            seed=seed,
            decoder=decoder,
            show_progress=ranks.is_main,
        )
        stats.update(timings, fast_decode=decoder is not None, batches=len(batches))
        stats["seconds"] = timings["generate_seconds"]
        stats["questions_per_second"] = len(todo) / stats["seconds"] if stats["seconds"] else None
    if ranks.world_size > 1:
        stats = combine_stats(ranks.gather(stats))
    records = store.finish(ordered_by([s.key for s in samples]))
    return ({k: r["text"] for k, r in records.items()} if records is not None else {}), stats


def combine_stats(per_rank: Sequence[dict]) -> dict:
    """The stats of a multi-process run: questions and batches summed, each time the slowest process's (the run
    waits for it), ``questions_per_second`` of the whole run, and every process's own stats under ``per_rank``."""
    out = dict(per_rank[0])
    out["questions"] = sum(s["questions"] for s in per_rank)
    out["batches"] = sum(s["batches"] for s in per_rank)
    out["fast_decode"] = any(s["fast_decode"] for s in per_rank)
    for key in ("seconds", *TIMING_KEYS):
        out[key] = max(s[key] for s in per_rank)
    out["questions_per_second"] = out["questions"] / out["seconds"] if out["seconds"] else None
    out["world_size"] = len(per_rank)
    out["per_rank"] = list(per_rank)
    return out


def _prepare(processor, batch: Sequence[Sample], prompts: dict[str, str]):
    """The whole batch through one ``processor(...)`` call: the reference the per-image path must equal, and the
    path of processors without a separate text step."""
    images = [[decode_image(s.image)] if s.image is not None else [] for s in batch]
    return processor(
        images=images, text=[prompts[s.key] for s in batch], padding=True, padding_side="left", return_tensors="pt"
    )


def _supports_per_image(processor) -> bool:
    """Whether the processor's image and text steps can run apart (``encode_text``: InternVLChatProcessor and its
    remote-code copies); other processors get one ``processor(...)`` call per batch."""
    has_images = getattr(processor, "image_processor", None) is not None
    return has_images and callable(getattr(processor, "encode_text", None))


def _load_pixels(processor, sample: Sample) -> torch.Tensor:
    """One question's image, decoded and preprocessed on its own: (1, 3, S, S) float32. The image processor handles
    each image independently, so concatenating these equals one call on the whole batch."""
    return processor.image_processor(images=[decode_image(sample.image)], return_tensors="pt")["pixel_values"]


def _batch_inputs(processor, batch: Sequence[Sample], prompts: dict[str, str], pixels: Sequence[torch.Tensor]):
    """A batch's model inputs from its per-image ``pixels`` (the questions with an image, in batch order): the same
    tensors, and the same placeholder / truncation checks, as ``_prepare``, through the processor's text step."""
    from transformers import BatchFeature

    texts = [prompts[s.key] for s in batch]
    num_images = [int(s.image is not None) for s in batch]
    data = dict(processor.encode_text(texts, num_images=num_images, padding=True, padding_side="left"))
    if pixels:
        data["pixel_values"] = torch.cat(list(pixels))
    return BatchFeature(data=data, tensor_type="pt")


class _Prefetcher:
    """Prepares the batches in order, up to ``prefetch`` ahead of the one the model works on.

    Each image is its own task in a pool of ``num_workers`` threads (PIL decoding / resizing and numpy release the
    GIL), so a batch of 64 images is ready after about 64 / num_workers image times instead of 64 (the first batch
    has nothing to overlap with); one more thread assembles batches (tokenize, wait for the images, concatenate)
    off the main thread. The pool is FIFO, so the images of earlier batches are done first.
    """

    def __init__(self, processor, batches, prompts, num_workers: int, prefetch: int):
        self.processor, self.batches, self.prompts = processor, batches, prompts
        self.per_image = _supports_per_image(processor)
        self.images = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="eval-image")
        self.assembler = ThreadPoolExecutor(1, thread_name_prefix="eval-batch")
        self.pending: deque[Future] = deque()
        self.submitted = 0
        self.cpu_seconds = 0.0
        self._lock = threading.Lock()
        for _ in range(max(0, prefetch) + 1):
            self._submit_next()

    def _add(self, seconds: float) -> None:
        with self._lock:
            self.cpu_seconds += seconds

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._add(time.perf_counter() - start)

    def _assemble(self, batch, pixel_futures):
        pixels = [f.result() for f in pixel_futures]
        return self._timed(_batch_inputs, self.processor, batch, self.prompts, pixels)

    def _submit_next(self) -> None:
        if self.submitted >= len(self.batches):
            return
        batch = self.batches[self.submitted]
        self.submitted += 1
        if self.per_image:
            pixels = [
                self.images.submit(self._timed, _load_pixels, self.processor, s) for s in batch if s.image is not None
            ]
            self.pending.append(self.assembler.submit(self._assemble, batch, pixels))
        else:
            self.pending.append(self.images.submit(self._timed, _prepare, self.processor, batch, self.prompts))

    def next(self):
        """The next batch's inputs (blocks until prepared); queues the batch ``prefetch`` further first, so the
        workers never idle while the caller waits."""
        future = self.pending.popleft()
        self._submit_next()
        return future.result()

    def close(self) -> None:
        # Queued work is useless once the loop stops (error or end): cancel it; the images first, so an assembling
        # task waiting on one of them wakes up.
        self.images.shutdown(wait=True, cancel_futures=True)
        self.assembler.shutdown(wait=True, cancel_futures=True)


# generation_config settings under which `model.generate`'s greedy tokens differ from a plain argmax (logits
# processors, minimum lengths), with their no-op values; FastGreedyDecoder applies none of them.
_NEUTRAL_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None, {}),
    "exponential_decay_length_penalty": (None,),
    "stop_strings": (None, [], ""),
}


def _fast_decode_blockers(model) -> list[str]:
    """Why `FastGreedyDecoder` would not give ``model.generate``'s answers for this model (empty: it would)."""
    reasons = []
    if (
        getattr(model, "lm_head", None) is None
        or getattr(getattr(model, "model", None), "language_model", None) is None
    ):
        reasons.append("the model has no .model.language_model / .lm_head")
    config = getattr(model, "generation_config", None)
    for key, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(config, key, None)
        if not any(value == n for n in neutral):
            reasons.append(f"generation_config.{key}={value!r}")
    return reasons


_DECODER_ATTR = "_eval_fast_greedy_decoder"
_LENGTH_BUCKET = 32


def _fast_decoder(model, batch_size: int, max_length: int):
    """The model's `FastGreedyDecoder` for ``batch_size`` × ``max_length`` (rounded up to a multiple of 32).

    [IMPORTANT] reused across calls of the same batch size and length: a new decoder compiles its step again (and
    records new CUDA graphs), which takes longer than a whole short-answer benchmark. It lives on the model (not in a
    global), so dropping the model frees it. Not reused for a smaller batch or a shorter length: short batches are
    filled up to the decoder's batch size (`_fill_rows`) and a longer static cache makes every decode step attend over
    (and read) more empty slots, so an oversized decoder would waste work on every step.
    """
    from ..generation import FastGreedyDecoder

    max_length = -(-max_length // _LENGTH_BUCKET) * _LENGTH_BUCKET
    decoder = getattr(model, _DECODER_ATTR, None)
    if decoder is None or decoder.max_batch_size != batch_size or decoder.max_length != max_length:
        decoder = FastGreedyDecoder(model, max_batch_size=batch_size, max_length=max_length)
        object.__setattr__(model, _DECODER_ATTR, decoder)
    return decoder


def _fill_rows(inputs, rows: int, image_token_id: int, image_seq_length: int):
    """(input_ids, attention_mask, pixel_values) with the last question repeated up to ``rows`` rows.

    [IMPORTANT] the compiled decode step is recorded for one batch size: a short last batch would compile it (and
    capture CUDA graphs) again, which costs more than many full batches. The repeats' answers are dropped. Left as is
    when the last row holds several images (not a short-answer question)."""
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")
    missing = rows - ids.shape[0]
    image_tokens = int((ids[-1] == image_token_id).sum())
    if missing <= 0 or image_tokens not in (0, image_seq_length):
        return ids, mask, pixels
    ids = torch.cat([ids, ids[-1:].expand(missing, -1)])
    mask = torch.cat([mask, mask[-1:].expand(missing, -1)])
    if image_tokens:  # one image, the batch's last (images are stacked in row order)
        pixels = torch.cat([pixels, pixels[-1:].expand(missing, *pixels.shape[1:])])
    return ids, mask, pixels


def _as_generate_output(tokens: torch.Tensor, eos_ids: list[int], fill_id: int | None) -> torch.Tensor:
    """The decoder's tokens (EOS repeated after a row's first EOS) in ``model.generate``'s layout: a row keeps its
    first EOS, then holds ``fill_id``, and the columns end where the last row to finish emitted its EOS."""
    if not eos_ids:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    if fill_id is not None:
        tokens = tokens.masked_fill((is_eos.long().cumsum(1) - is_eos.long()) > 0, fill_id)
    if bool(is_eos.any(1).all()):
        tokens = tokens[:, : int(is_eos.long().argmax(1).max()) + 1]
    return tokens


def _run_batches(
    model,
    processor,
    batches,
    prompts,
    store,
    *,
    max_new_tokens,
    num_workers,
    prefetch,
    model_id,
    desc,
    seed,
    decoder=None,
    show_progress=True,
) -> dict[str, float]:
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad_id = processor.tokenizer.pad_token_id
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id)
    # Clear sampling settings a checkpoint's generation_config may carry, so greedy decoding warns about nothing.
    gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    from ..generation import token_ids

    eos_ids = token_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    # `generate` pads finished rows with the first EOS id when there is no pad token.
    fill_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else None)
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    total = sum(len(b) for b in batches)
    loop_start = time.perf_counter()
    prefetcher = _Prefetcher(processor, batches, prompts, num_workers, prefetch)
    try:
        with tqdm(total=total, desc=desc, unit="q", disable=not show_progress) as bar:
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                inputs = prefetcher.next()
                waited = time.perf_counter() - start
                timings["wait_seconds"] += waited
                if i == 0:
                    timings["first_wait_seconds"] = waited

                start = time.perf_counter()
                inputs = {k: v.to(device) for k, v in inputs.items()}
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                timings["transfer_seconds"] += time.perf_counter() - start

                start = time.perf_counter()
                prompt_len = inputs["input_ids"].shape[1]
                if decoder is not None:
                    if len(batch) > decoder.max_batch_size or prompt_len + max_new_tokens > decoder.max_length:
                        logger.warning("%s: batch %d outgrows the fast decoder; building a larger one", desc, i)
                        decoder = _fast_decoder(model, len(batch), prompt_len + max_new_tokens)
                    # The decoder runs under its own no_grad (as tested and benchmarked), not inference_mode: its
                    # static cache is updated in place by the compiled step.
                    ids, mask, pixels = _fill_rows(
                        inputs, decoder.max_batch_size, model.config.image_token_id, model.config.image_seq_length
                    )
                    new_tokens = decoder.generate(
                        ids, mask, pixels, max_new_tokens=max_new_tokens, eos_token_id=eos_ids
                    )[: len(batch)]
                    new_tokens = _as_generate_output(new_tokens, eos_ids, fill_id)
                else:
                    with torch.inference_mode():
                        new_tokens = model.generate(**inputs, **gen_kwargs)[:, prompt_len:]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings["generate_seconds"] += time.perf_counter() - start

                start = time.perf_counter()
                texts = processor.post_process_image_text_to_text(new_tokens)
                records = []
                for s, text in zip(batch, texts):
                    rec = {
                        "question_id": s.id,
                        "prompt": s.prompt,
                        "text": text,
                        "answer_id": answer_id(model_id, s.key, text),
                        "model_id": model_id,
                        "metadata": {},
                    }
                    if s.uid:
                        rec["key"] = s.uid
                    records.append(rec)
                store.append(records)
                bar.update(len(batch))
                timings["postprocess_seconds"] += time.perf_counter() - start
    finally:
        prefetcher.close()
    timings["loop_seconds"] = time.perf_counter() - loop_start
    timings["prepare_cpu_seconds"] = prefetcher.cpu_seconds
    return timings
