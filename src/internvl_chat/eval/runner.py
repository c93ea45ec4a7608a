"""Batched, resumable, deterministic generation for the benchmarks.

    from internvl_chat.eval.runner import load_model, generate_predictions
    model, processor = load_model("out/llava-7b")
    preds, stats = generate_predictions(model, processor, samples, "out/eval/textvqa/predictions.jsonl",
                                        batch_size=16, max_new_tokens=128)

* **Batches**: questions are sorted by prompt length (longest first, ties in file order) and cut into batches, so
  padding is small; prompts are left-padded (the core model's batched ``generate`` equals one-by-one).
* **Prefetch**: images are decoded and preprocessed (``processor(...)``) for the next batches in a thread pool
  while the model generates the current one.
* **Resumable**: each finished batch is appended to ``predictions.jsonl`` (LLaVA's answer-file fields:
  ``question_id``, ``prompt``, ``text``, ``model_id``, ``metadata``) and flushed; a rerun skips the ids already
  there (a line cut by a crash is dropped). When every question is answered the file is rewritten in question-file
  order, so an interrupted-then-resumed run and a straight run give the same file.
* **Deterministic**: greedy decoding (``do_sample=False, num_beams=1``), fixed seed, length-sorted order
  independent of the batch size.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tasks import Sample, decode_image

logger = logging.getLogger(__name__)


def load_model(model_dir: str, device: str | None = None, dtype: str = "auto", attn_implementation: str = "sdpa"):
    """Loads model + processor with ``trust_remote_code=True``; fp16 on CUDA by default (LLaVA's eval dtype),
    fp32 on CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import internvl_chat  # noqa: F401  (registers the Auto classes)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, trust_remote_code=True, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


def build_prompt(processor, sample: Sample, template: str | None = None, system: str | None = None) -> str:
    """The full model prompt of one question through the model's chat template (or ``template``, a registered
    template name): user turn = image + ``sample.prompt``, then the generation prompt (``ASSISTANT:``...)."""
    content = ([{"type": "image"}] if sample.image is not None else []) + [{"type": "text", "text": sample.prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if template is not None:
        from ..templates import render_chat

        return render_chat(messages, template, add_generation_prompt=True)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class PredictionStore:
    """The append-only ``predictions.jsonl`` of one task."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._order: list[str] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good = 0
        for line in raw.splitlines(keepends=True):
            # [IMPORTANT] a run killed mid-write leaves a partial last line: drop it (and cut it from the file) so
            # the rerun's appended lines stay valid JSONL.
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            good += len(line)
            key = str(rec.get("key", rec["question_id"]))
            if key not in self.records:
                self._order.append(key)
            self.records[key] = rec
        if good != len(raw):
            logger.warning("dropping a truncated line at the end of %s", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def append(self, records: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                key = str(rec.get("key", rec["question_id"]))
                if key not in self.records:
                    self._order.append(key)
                self.records[key] = rec
            f.flush()
            os.fsync(f.fileno())

    def finalize(self, order: Sequence[str]) -> None:
        """Rewrites the file in question-file order (answers of ids not in ``order`` are kept at the end)."""
        keys = [k for k in order if k in self.records]
        keys += [k for k in self._order if k not in set(keys)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for k in keys:
                f.write(json.dumps(self.records[k], ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)
        self._order = keys

    def texts(self) -> dict[str, str]:
        return {k: r["text"] for k, r in self.records.items()}


def _prompt_length(processor, prompt: str, has_image: bool) -> int:
    n = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return n + (getattr(processor, "image_seq_length", 0) if has_image else 0)


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
) -> tuple[dict[str, str], dict]:
    """Generates the missing answers of ``samples`` into ``output_file``; returns ({key: text}, speed stats)."""
    store = PredictionStore(output_file)
    todo = [s for s in samples if s.key not in store.records]
    stats = {"questions": len(todo), "seconds": 0.0, "questions_per_second": None, "batch_size": batch_size}
    if todo:
        logger.info(
            "%s: %d questions to answer (%d already in %s)", desc, len(todo), len(samples) - len(todo), output_file
        )
        prompts = {s.key: build_prompt(processor, s, template, system) for s in todo}
        lengths = {s.key: _prompt_length(processor, prompts[s.key], s.image is not None) for s in todo}
        # Longest first: the peak-memory batch comes first (fail fast); `sorted` is stable, so ties keep file order.
        ordered = sorted(todo, key=lambda s: -lengths[s.key])
        batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        model_id = model_id or getattr(model.config, "_name_or_path", "") or "model"
        stats["seconds"] = _run_batches(
            model, processor, batches, prompts, store, max_new_tokens, num_workers, prefetch, model_id, desc, seed
        )
        stats["questions_per_second"] = len(todo) / stats["seconds"] if stats["seconds"] else None
    store.finalize([s.key for s in samples])
    return store.texts(), stats


def _prepare(processor, batch: Sequence[Sample], prompts: dict[str, str]):
    images = [[decode_image(s.image)] if s.image is not None else [] for s in batch]
    return processor(
        images=images, text=[prompts[s.key] for s in batch], padding=True, padding_side="left", return_tensors="pt"
    )


def _run_batches(
    model, processor, batches, prompts, store, max_new_tokens, num_workers, prefetch, model_id, desc, seed
):
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad_id = processor.tokenizer.pad_token_id
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id)
    # Clear sampling settings a checkpoint's generation_config may carry, so greedy decoding warns about nothing.
    gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    total = sum(len(b) for b in batches)
    elapsed = 0.0
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, tqdm(total=total, desc=desc, unit="q") as bar:
        pending = [pool.submit(_prepare, processor, b, prompts) for b in batches[: prefetch + 1]]
        for i, batch in enumerate(batches):
            inputs = pending[i].result()
            if i + prefetch + 1 < len(batches):
                pending.append(pool.submit(_prepare, processor, batches[i + prefetch + 1], prompts))
            pending[i] = None  # free the prepared tensors
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, **gen_kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            texts = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
            records = []
            for s, text in zip(batch, texts):
                rec = {"question_id": s.id, "prompt": s.prompt, "text": text, "model_id": model_id, "metadata": {}}
                if s.uid:
                    rec["key"] = s.uid
                records.append(rec)
            store.append(records)
            bar.update(len(batch))
    return elapsed
