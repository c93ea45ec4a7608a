"""The three steps of `internvl-chat data generate` over a file or folder of records: reading and de-duplicating
the input, the calls (bounded concurrency), the journal that makes a killed run resumable, the output file, the
summary JSON and the dry-run estimate.

    from internvl_chat.data.generate.run import GenerateConfig, run
    summary = run(GenerateConfig(step="captions", input="images/", output="caps.json",
                                 base_url="https://api.openai.com/v1", model="gpt-4o"))

Records per step (LLaVA JSON; the extra fields are kept for the next step and ignored by training):

* ``captions`` (image → detailed caption): ``{"id", "image", "source", "caption",
  "conversations": [{"from": "human", "value": "<image>\\n" + --question}, {"from": "gpt", "value": caption}]}``
* ``enrich`` (image + human caption + OCR → detail-enriched caption): the same, with ``caption`` the enriched one,
  ``human_caption`` the input's and ``ocr`` the OCR text used.
* ``qa`` (caption + OCR → extractive QA pairs, each followed by its self-explain pair): ``{"id", "image", "source",
  "caption", "ocr", "conversations": [Q1, A1, Q1', A1', Q2, A2, ...]}``, ``<image>\\n`` before the first question;
  every 4 turns are one duo (extractive pair, self-explain pair), the unit `select --metric ffd` scores.

Files: OUTPUT (``.json`` list or ``.jsonl``), ``OUTPUT.journal.jsonl`` (one line per finished record: the result,
or the reason it failed, and the tokens it used; appended and fsynced one record at a time) and
``STEM.summary.json``. A rerun reads the journal and does only what is not in it (records that failed on an endpoint
error are tried again; ``--retry-failed`` retries every failure); OUTPUT and the summary are rewritten atomically
from the journal in input order, so a killed and resumed run writes the same files as an uninterrupted one. Delete
the journal to start over.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..formats import IMAGE_EXTENSIONS, file_content_id
from ..sharding import EXIT_AFTER_ENV, append_jsonl, read_jsonl
from .prompts import STEPS, load_prompts

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_TOKENS", "GenerateConfig", "journal_path", "run", "summary_path"]

DEFAULT_MAX_TOKENS = {"captions": 1024, "enrich": 1024, "qa": 2048}
DEFAULT_QUESTION = "Describe this image in detail."
ID_HEX = 16
# Failures a rerun tries again without --retry-failed: the endpoint did not answer or the image could not be read;
# the record itself may be fine next time.
RETRIED_REASONS = {"api_error", "image_error"}
FAILURES_LOGGED = 3  # warnings per failure reason (the journal and the summary hold them all)
# Stop when this many records in a row failed on the endpoint before any succeeded (a wrong URL, a dead server).
ABORT_AFTER_API_ERRORS = 8


@dataclass
class GenerateConfig:
    step: str
    input: str
    output: str
    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    image_folder: str | None = None
    prompts: str | None = None
    source: str = "natural"  # prompt of records without a source field
    source_field: str = "source"
    caption_field: str = "caption"
    ocr_field: str = "ocr"
    ocr_engine: str | None = None  # "rapidocr": run OCR where the record has no OCR field
    num_qa: int = 3
    question: str = DEFAULT_QUESTION
    send_image: bool | None = None  # None: captions and enrich send the image, qa does not
    image_detail: str = "auto"
    concurrency: int = 4
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_retries: int = 5
    timeout: float = 120.0
    max_tokens: int | None = None
    temperature: float | None = None
    json_mode: bool = False
    retry_failed: bool = False
    dry_run: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def sends_image(self) -> bool:
        return self.step != "qa" if self.send_image is None else self.send_image


@dataclass
class Item:
    """One input record to process: its id, position, the record, its image path and its prompt source."""

    id: str
    index: int
    record: dict[str, Any]
    image: str | None
    source: str


def journal_path(output: str) -> str:
    return os.fspath(output) + ".journal.jsonl"


def summary_path(output: str) -> str:
    return os.path.splitext(os.fspath(output))[0] + ".summary.json"


# ------------------------------------------------------------------------------------------------------- input


def _read_input(cfg: GenerateConfig) -> tuple[list[dict[str, Any]], str]:
    """Raw records and the folder image paths are relative to."""
    path = cfg.input
    if os.path.isdir(path):
        if cfg.step != "captions":
            raise ValueError(f"{cfg.step} reads a .json / .jsonl file of records (a folder is for captions): {path}")
        root = cfg.image_folder or path
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return [{"image": os.path.relpath(p, root)} for p in files], root
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    root = cfg.image_folder or os.path.dirname(os.path.abspath(path))
    if path.endswith((".json", ".jsonl")):
        from ..formats import read_llava_records

        records = read_llava_records(path)
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: record {i} is a {type(record).__name__}, not an object")
        return records, root
    if cfg.step != "captions":
        raise ValueError(f"{cfg.step} reads a .json / .jsonl file of records: {path}")
    with open(path, encoding="utf-8") as f:  # a list of image paths, one per line
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    return [{"image": line} for line in lines], root


def _image_of(record: dict[str, Any], index: int, path: str) -> str | None:
    image = record.get("image", record.get("images"))
    if isinstance(image, list):
        if len(image) != 1:
            raise ValueError(f"{path}: record {record.get('id', index)!r} has {len(image)} images (one expected)")
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{path}: record {record.get('id', index)!r}: 'image' must be a path string")
    return image


def load_items(cfg: GenerateConfig, sources: set[str]) -> tuple[list[Item], Counter]:
    """The records to process, in input order, with duplicates removed (counted by kind)."""
    records, root = _read_input(cfg)
    items, seen_ids, seen_images, duplicates = [], set(), {}, Counter()
    for index, record in enumerate(records):
        image = _image_of(record, index, cfg.input)
        image_path = None
        if image is not None:
            image_path = image if os.path.isabs(image) else os.path.join(root, image)
        if cfg.sends_image() and image is None:
            raise ValueError(f"{cfg.input}: record {record.get('id', index)!r} has no 'image' ({cfg.step} sends it)")
        content = None
        if cfg.step == "captions" and image_path is not None and os.path.isfile(image_path):
            content = file_content_id(image_path, ID_HEX)  # the same picture under two names is captioned once
        rid = record.get("id")
        if rid is None:
            rid = content or hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:ID_HEX]
        rid = str(rid)
        if content is not None and content in seen_images:
            duplicates["duplicate_image"] += 1
            logger.info("record %s: same image as record %s, skipped", rid, seen_images[content])
            continue
        if rid in seen_ids:
            duplicates["duplicate_id"] += 1
            continue
        seen_ids.add(rid)
        if content is not None:
            seen_images[content] = rid
        source = record.get(cfg.source_field) or cfg.source
        if source not in sources:
            raise ValueError(
                f"{cfg.input}: record {rid!r}: no {cfg.step} prompt for source {source!r} "
                f"(known: {', '.join(sorted(sources))}; add STEP/{source}.txt to a --prompts folder)"
            )
        items.append(Item(rid, index, record, image_path, str(source)))
    return items, duplicates


def _caption_of(record: dict[str, Any], field_name: str) -> str | None:
    """The record's caption field, else its first assistant turn (a captions / LLaVA caption record)."""
    value = record.get(field_name)
    if isinstance(value, str) and value.strip():
        return value.strip()
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("gpt", "assistant"):
            text = turn.get("value", turn.get("content"))
            return text.strip() if isinstance(text, str) and text.strip() else None
    return None


# ------------------------------------------------------------------------------------------------------ steps
class Worker:
    """Builds the calls of one record and turns the replies into its output record (runs in worker threads)."""

    def __init__(self, cfg: GenerateConfig, client: Any = None):
        from .checks import CAPTION_FORMAT, QA_FORMAT

        self.cfg = cfg
        self.prompts = load_prompts(cfg.step, cfg.prompts)
        self.format = (QA_FORMAT if cfg.step == "qa" else CAPTION_FORMAT).replace("{num_qa}", str(cfg.num_qa))
        self.max_tokens = cfg.max_tokens or DEFAULT_MAX_TOKENS[cfg.step]
        self.client = client
        self.ocr = None
        if cfg.ocr_engine == "rapidocr":
            from .ocr import RapidOCREngine

            self.ocr = RapidOCREngine()
        elif cfg.ocr_engine not in (None, "none"):
            raise ValueError(f"unknown --ocr-engine {cfg.ocr_engine!r} (known: rapidocr)")

    # -- inputs of a record
    def _image(self, item: Item) -> tuple[Any, bytes]:
        from ..images import load_image

        with open(item.image, "rb") as f:
            raw = f.read()
        return load_image(raw, name=item.image), raw

    def _ocr_field(self, item: Item) -> str | None:
        from .ocr import ocr_from_field

        try:
            return ocr_from_field(item.record.get(self.cfg.ocr_field))
        except ValueError as err:
            raise _failed("bad_ocr_field", str(err)) from None

    def messages(self, item: Item, values: dict[str, Any], image_url: str | None, tokens: int = 765) -> list[dict]:
        prompt = self.prompts.user(item.source, source=item.source, num_qa=self.cfg.num_qa, **values)
        text = f"{prompt}\n\n{self.format}"
        content: Any = text
        if image_url is not None:
            content = [
                {"type": "text", "text": text},
                {
                    "type": "image_url",
                    "image_url": {"url": image_url, "detail": self.cfg.image_detail},
                    "_tokens": tokens,
                },
            ]
        return [{"role": "system", "content": self.prompts.system}, {"role": "user", "content": content}]

    def prompt_values(self, item: Item, ocr: str | None) -> dict[str, Any]:
        """The placeholder values of a record; raises RecordFailed when a needed field is missing."""
        if self.cfg.step == "captions":
            return {}
        caption = _caption_of(item.record, self.cfg.caption_field)
        if caption is None:
            raise _failed("no_caption", f"no '{self.cfg.caption_field}' field and no assistant turn")
        if self.cfg.step == "enrich":
            return {"human_caption": caption, "ocr": ocr}
        return {"caption": caption, "ocr": ocr, "human_caption": item.record.get("human_caption")}

    # -- one record
    def __call__(self, item: Item) -> dict[str, Any]:
        from .api import RecordFailed, Usage

        usage = Usage()
        entry: dict[str, Any] = {"id": item.id, "step": self.cfg.step}
        try:
            record, rejected = self._process(item, usage)
            entry.update(status="ok", record=record)
        except RecordFailed as err:
            entry.update(status="failed", reason=err.reason, detail=err.detail)
            rejected = getattr(err, "rejected", {})
        if rejected:
            entry["rejected"] = dict(rejected)
        entry["usage"] = dict(usage)
        return entry

    def _process(self, item: Item, usage: Any) -> tuple[dict[str, Any], Counter]:
        from .api import ask_structured, image_data_url, image_tokens
        from .checks import parse_caption, parse_qa

        cfg = self.cfg
        image, image_url, tokens = None, None, 765
        ocr = None if cfg.step == "captions" else self._ocr_field(item)
        if cfg.sends_image() or (ocr is None and self.ocr is not None and cfg.step != "captions"):
            from ..images import ImageLoadError  # torch: only where an image is opened

            try:
                image, raw = self._image(item)
                if cfg.sends_image():
                    image_url = image_data_url(image, raw)
                    tokens = image_tokens(*image.size, cfg.image_detail)
                if ocr is None and self.ocr is not None and cfg.step != "captions":
                    ocr = self.ocr(image)
            except (ImageLoadError, OSError) as err:
                raise _failed("image_error", str(err)) from None
        values = self.prompt_values(item, ocr)
        messages = self.messages(item, values, image_url, tokens)
        out = {"id": item.id}
        if item.record.get("image") is not None or item.record.get("images") is not None:
            out["image"] = _image_of(item.record, item.index, cfg.input)
        out["source"] = item.source
        if cfg.step in ("captions", "enrich"):
            caption = ask_structured(self.client, messages, parse_caption, self.max_tokens, usage)
            out["caption"] = caption
            if cfg.step == "enrich":
                out["human_caption"] = values["human_caption"]
                out["ocr"] = ocr or ""
            out["conversations"] = [
                {"from": "human", "value": "<image>\n" + cfg.question},
                {"from": "gpt", "value": caption},
            ]
            return out, Counter()
        pairs = ask_structured(self.client, messages, parse_qa, self.max_tokens, usage)
        kept, rejected = select_pairs(pairs, [values["caption"], ocr, values.get("human_caption")], cfg.num_qa)
        if not kept:
            err = _failed("no_valid_qa", f"none of the {len(pairs)} QA pairs passed: {dict(rejected)}")
            err.rejected = rejected
            raise err
        turns = []
        for pair in kept:
            turns += [
                {"from": "human", "value": pair.question},
                {"from": "gpt", "value": pair.answer},
                {"from": "human", "value": pair.explain_question},
                {"from": "gpt", "value": pair.explain_answer},
            ]
        if out.get("image") is not None:
            turns[0] = {"from": "human", "value": "<image>\n" + turns[0]["value"]}
        out.update(caption=values["caption"], ocr=ocr or "", conversations=turns)
        return out, rejected


def _failed(reason: str, detail: str):
    from .api import RecordFailed

    return RecordFailed(reason, detail)


def select_pairs(pairs: list[Any], sources: list[str | None], limit: int) -> tuple[list[Any], Counter]:
    """The pairs kept for a record: extractive (answer found in a source text), not a repeated question, at most
    ``limit``; the others counted by reason (``non_extractive``, ``duplicate_question``, ``over_limit``)."""
    from .checks import is_extractive, normalize

    kept, rejected, questions = [], Counter(), set()
    for pair in pairs:
        question = normalize(pair.question)
        if not is_extractive(pair.answer, sources):
            rejected["non_extractive"] += 1
        elif question in questions:
            rejected["duplicate_question"] += 1
        elif len(kept) >= limit:
            rejected["over_limit"] += 1
        else:
            kept.append(pair)
            questions.add(question)
    return kept, rejected


# ------------------------------------------------------------------------------------------------ the run
def _api_key(cfg: GenerateConfig) -> str:
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    host = urlparse(cfg.base_url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if local:  # a local server (ours without --api-key, vLLM...) accepts any key
        return "EMPTY"
    raise ValueError(f"set the API key in ${cfg.api_key_env} (or name another variable with --api-key-env)")


def _latest(entries: list[dict[str, Any]], step: str, journal: str) -> dict[str, dict[str, Any]]:
    latest = {}
    for entry in entries:
        if entry.get("step") != step or "id" not in entry:
            raise ValueError(f"{journal} was written by another step ({entry.get('step')!r}); delete it to start over")
        latest[str(entry["id"])] = entry
    return latest


def _finished(entry: dict[str, Any] | None, retry_failed: bool) -> bool:
    if entry is None:
        return False
    if entry.get("status") == "ok":
        return True
    return not retry_failed and entry.get("reason") not in RETRIED_REASONS


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _previous_tokens(cfg: GenerateConfig) -> dict[str, Any]:
    """Tokens of the steps that produced the input (its summary, when it sits next to it)."""
    if os.path.isdir(cfg.input):
        return {}
    try:
        with open(summary_path(cfg.input), encoding="utf-8") as f:
            tokens = json.load(f).get("tokens", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in tokens.items() if k != cfg.step and isinstance(v, dict)}


def summarize(
    cfg: GenerateConfig, items: list[Item], duplicates: Counter, entries: list[dict[str, Any]]
) -> dict[str, Any]:
    from .api import Usage

    latest = _latest(entries, cfg.step, journal_path(cfg.output))
    failed, rejected, out = Counter(), Counter(), 0
    pairs = 0
    for item in items:
        entry = latest.get(item.id)
        if entry is None:
            failed["not_done"] += 1
            continue
        rejected.update(entry.get("rejected", {}))
        if entry["status"] == "ok":
            out += 1
            pairs += len(entry["record"]["conversations"]) // 4 if cfg.step == "qa" else 0
        else:
            failed[entry["reason"]] += 1
    usage = Usage()
    for entry in entries:  # every attempt's tokens were spent, a retried record's first attempt too
        usage.add(entry.get("usage", {}))
    summary = {
        "step": cfg.step,
        "input": cfg.input,
        "output": cfg.output,
        "base_url": cfg.base_url,
        "model": cfg.model,
        "journal": journal_path(cfg.output),
        "prompts": load_prompts(cfg.step, cfg.prompts).files,
        "records_in": len(items) + sum(duplicates.values()),
        "duplicates": dict(sorted(duplicates.items())),
        "records_out": out,
        "failed": dict(sorted(failed.items())),
        "rejected": dict(sorted(rejected.items())),
    }
    if cfg.step == "qa":
        summary["duos_out"] = pairs
    summary["tokens"] = {**_previous_tokens(cfg), cfg.step: dict(usage)}
    return summary


def _exit_after() -> int | None:
    value = os.environ.get(EXIT_AFTER_ENV)
    return int(value) if value else None


def run(cfg: GenerateConfig, client: Any = None, out: Any = None) -> dict[str, Any]:
    """Runs one step (or, with ``cfg.dry_run``, estimates it, printing to ``out``, default stdout); returns the
    summary (also written to the file) or the estimate."""
    out = out or sys.stdout
    if cfg.step not in STEPS:
        raise ValueError(f"unknown step {cfg.step!r} (known: {', '.join(STEPS)})")
    if cfg.num_qa < 1 or cfg.concurrency < 1 or (cfg.max_tokens is not None and cfg.max_tokens < 1):
        raise ValueError("--num-qa, --concurrency and --max-tokens must be at least 1")
    if "<image>" in cfg.question:
        raise ValueError("--question must not contain <image> (it is put in front of the question)")
    prompts = load_prompts(cfg.step, cfg.prompts)
    items, duplicates = load_items(cfg, set(prompts.sources))
    journal = journal_path(cfg.output)
    entries = read_jsonl(journal)
    latest = _latest(entries, cfg.step, journal)
    todo = [item for item in items if not _finished(latest.get(item.id), cfg.retry_failed)]
    if cfg.dry_run:
        return dry_run(cfg, items, todo, duplicates, out)
    if todo:
        from .api import ChatClient, RateLimiter

        limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        client = client or ChatClient(
            cfg.base_url,
            cfg.model,
            _api_key(cfg),
            limiter=limiter,
            max_retries=cfg.max_retries,
            timeout=cfg.timeout,
            temperature=cfg.temperature,
            json_mode=cfg.json_mode,
        )
        _work(cfg, Worker(cfg, client), todo, len(items) - len(todo))
        entries = read_jsonl(journal)
    summary = summarize(cfg, items, duplicates, entries)
    latest = _latest(entries, cfg.step, journal)
    records = [latest[i.id]["record"] for i in items if latest.get(i.id, {}).get("status") == "ok"]
    if cfg.output.endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    _write_atomic(cfg.output, text)
    _write_atomic(summary_path(cfg.output), json.dumps(summary, indent=1) + "\n")
    return summary


def _work(cfg: GenerateConfig, worker: Worker, todo: list[Item], done_before: int) -> None:
    """Runs ``worker`` over ``todo`` on ``cfg.concurrency`` threads; the main thread journals each finished record."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .api import EndpointError

    journal = journal_path(cfg.output)
    exit_after, written = _exit_after(), 0
    counts: Counter = Counter()
    queue = iter(todo)
    if done_before:
        logger.info("resuming: %d record(s) already in %s", done_before, journal)
    bar = tqdm(total=len(todo), desc=f"generate {cfg.step}", unit="rec", disable=not cfg.progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="generate")
    pending: set = set()

    def refill() -> None:
        # a bounded window of submitted records: a huge input is not turned into a million futures at once
        while len(pending) < 2 * cfg.concurrency:
            item = next(queue, None)
            if item is None:
                return
            pending.add(pool.submit(worker, item))

    def journal_entry(entry: dict[str, Any]) -> None:
        nonlocal written
        append_jsonl(journal, [entry], sync=True)
        written += 1
        if entry["status"] == "ok":
            counts["ok"] += 1
            counts["api_errors_in_a_row"] = 0
        else:
            counts["failed"] += 1
            counts[entry["reason"]] += 1
            counts["api_errors_in_a_row"] = counts["api_errors_in_a_row"] + 1 if entry["reason"] == "api_error" else 0
            if counts[entry["reason"]] <= FAILURES_LOGGED:
                logger.warning("record %s failed: %s: %s", entry["id"], entry["reason"], entry.get("detail", ""))
        counts["tokens"] += entry["usage"]["total_tokens"]
        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], tokens=counts["tokens"], refresh=False)
        bar.update(1)
        if exit_after is not None and written >= exit_after:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: die mid-run at a known point

    redirect = logging_redirect_tqdm()  # warnings print above the bar instead of through it
    redirect.__enter__()
    try:
        refill()
        while pending:
            finished, rest = wait(pending, return_when=FIRST_COMPLETED)
            pending.clear()
            pending.update(rest)
            error = None
            for future in finished:
                try:
                    journal_entry(future.result())
                except EndpointError as err:  # the other finished records are journaled first
                    error = err
            if error is not None:
                raise error
            if not counts["ok"] and counts["api_errors_in_a_row"] >= max(ABORT_AFTER_API_ERRORS, 2 * cfg.concurrency):
                raise EndpointError(
                    f"{counts['api_errors_in_a_row']} records in a row failed on the endpoint before any succeeded "
                    f"(see the warnings above); stopped sending (a rerun tries them again)"
                )
            refill()
    finally:
        redirect.__exit__(None, None, None)
        bar.close()
        # no new calls after an error or Ctrl-C; calls in flight finish (their records are simply redone)
        pool.shutdown(wait=False, cancel_futures=True)


def dry_run(cfg: GenerateConfig, items: list[Item], todo: list[Item], duplicates: Counter, out) -> dict[str, Any]:
    """Counts the calls and estimates the tokens of the records still to do; calls nothing, writes nothing."""
    from PIL import Image

    from .api import _estimate_messages, image_tokens

    worker = Worker(replace(cfg, ocr_engine=None))  # OCR is not run for an estimate: its text is not counted
    text_tokens = image_tok = unreadable = 0
    for item in todo:
        tokens, url = 765, None
        if cfg.sends_image():
            try:
                with Image.open(item.image) as img:  # the header only
                    tokens = image_tokens(img.width, img.height, cfg.image_detail)
            except OSError:
                unreadable += 1
                continue
            url, image_tok = "", image_tok + tokens
        try:
            values = worker.prompt_values(item, _caption_ocr(item, cfg))
        except Exception:  # noqa: BLE001 - a record the real run would fail: no call
            continue
        messages = worker.messages(item, values, url, tokens)
        text_tokens += _estimate_messages(messages) - (tokens if url is not None else 0)
    calls = len(todo) - unreadable
    output_max = calls * worker.max_tokens
    estimate = {
        "step": cfg.step,
        "model": cfg.model,
        "records_in": len(items) + sum(duplicates.values()),
        "duplicates": dict(sorted(duplicates.items())),
        "already_done": len(items) - len(todo),
        "calls": calls,
        "calls_with_repairs_max": 2 * calls,
        "input_tokens_estimate": text_tokens + image_tok,
        "input_text_tokens_estimate": text_tokens,
        "input_image_tokens_estimate": image_tok,
        "output_tokens_max": output_max,
        "unreadable_images": unreadable,
    }
    out.write(
        f"dry run: {cfg.step} with {cfg.model or '(no model)'}: {calls} call(s) for {len(todo)} record(s) "
        f"({estimate['already_done']} already done, {sum(duplicates.values())} duplicate(s) skipped); "
        f"up to {2 * calls} with one repair each\n"
        f"  input  ≈ {text_tokens + image_tok:,} tokens (text ≈ {text_tokens:,} at ~4 characters a token, "
        f"images ≈ {image_tok:,} by GPT-4o's image rule, detail={cfg.image_detail})\n"
        f"  output ≤ {output_max:,} tokens ({worker.max_tokens} max per call); replies are usually much shorter\n"
    )
    if cfg.ocr_engine not in (None, "none") and cfg.step != "captions":
        out.write("  (OCR is not run for the estimate: records without an OCR field count without OCR text)\n")
    if unreadable:
        out.write(f"  {unreadable} image(s) could not be opened (no call counted for them)\n")
    return estimate


def _caption_ocr(item: Item, cfg: GenerateConfig) -> str | None:
    from .ocr import ocr_from_field

    try:
        return ocr_from_field(item.record.get(cfg.ocr_field))
    except ValueError:
        return None
