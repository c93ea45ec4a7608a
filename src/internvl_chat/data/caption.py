"""`internvl-chat caption`: batch-caption a folder (or a list) of images into LLaVA-format JSON (ShareGPT4V-style).

    internvl-chat caption images/ --model DIR --output captions.json                    # stage-1 (`plain`) data
    internvl-chat caption images/ --model DIR --style detailed --output detailed.json \
        --prompt "Describe this image in detail." --batch-size 16 --max-new-tokens 512
    internvl-chat caption list.txt --model DIR --output caps.jsonl   # one path per line (relative to the list file)

    from internvl_chat.data.caption import caption_images, collect_images
    stats = caption_images(model, processor, collect_images("images/"), "captions.json", prompt="...")

Output records (LLaVA JSON, image paths relative to ``--image-root``, default the folder / the list file's folder,
so the file is used with ``--image-folder`` of the same root)::

    {"id": "<first 16 hex of the image's sha256>", "image": "sub/cat.jpg",
     "conversations": [{"from": "human", "value": "<image>"},                       # style plain: stage-1 data
                       {"from": "gpt", "value": "A cat on a sofa."}]}
    # style detailed: {"from": "human", "value": "<image>\\n<question>"} (--question, default the prompt)

``plain`` records are LLaVA stage-1 data: the ``plain`` template trains on ``<image>`` + caption + ``\\n`` (it drops
the human text anyway). ``detailed`` records are detailed-caption conversations (ShareGPT4V) for a finetune
template.

* Resumable: the captions of an unfinished job are appended batch by batch to ``OUTPUT.partial.jsonl`` (and its
  ``.rankN`` parts under a launcher); when every image is done they are added to OUTPUT (the ``.json`` list or the
  ``.jsonl`` lines, rewritten atomically) in input order. A rerun skips the images already in either.
* Data-parallel: under ``torchrun`` / ``accelerate launch`` the images are hashed and captioned in round-robin
  shares (`internvl_chat.data.sharding`), one device per process; OUTPUT is the one a single process writes, and a
  killed run resumes with any number of processes.
* Deduplicated by content: the id is the image's sha256 prefix, so the same picture under two names (or in two
  runs) is captioned once; duplicates are counted.
* Unreadable images (missing, corrupt, too large) are logged with their path, counted and skipped (retried on a
  rerun); an empty caption is counted and not written.
* Generation: greedy, batched with left padding, the model's chat template (``--template`` to change it) around
  ``<image>\\n`` + ``--prompt``; the text is cut at the template's stop strings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .formats import IMAGE_EXTENSIONS, file_content_id
from .sharding import Ranks, ShardedJsonl, close_process_group, launch_state, log_level, read_jsonl, shard

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROMPTS", "IMAGE_EXTENSIONS", "caption_images", "collect_images", "main", "make_parser"]

DEFAULT_PROMPTS = {
    # LLaVA-558k style brief caption / ShareGPT4V detailed caption instructions.
    "plain": "Give a brief description of the image.",
    "detailed": "Describe this image in detail.",
}
DEFAULT_MAX_NEW_TOKENS = {"plain": 77, "detailed": 512}
ID_HEX = 16
PARTIAL_SUFFIX = ".partial.jsonl"  # OUTPUT + this: the captions of an unfinished job


def collect_images(source: str | os.PathLike) -> tuple[list[str], str]:
    """Image paths of a folder (recursive, sorted) or a list file → ``(paths, root)``.

    ``root`` is the folder, or the list file's folder (relative lines in a list file are relative to it).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        paths = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return paths, source
    root = os.path.dirname(os.path.abspath(source))
    paths = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                paths.append(line if os.path.isabs(line) else os.path.join(root, line))
    return paths, root


def _read_records(path: str) -> list[dict[str, Any]]:
    """The records of a finished output: a JSON list (``.json``) or JSON lines (a torn line is skipped)."""
    if not path.endswith(".json"):
        return read_jsonl(path)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    return json.loads(text) if text else []


def _record_key(record: dict[str, Any]) -> str:
    return str(record["id"])


class Captioner:
    """Greedy batched captioning with a chat model and its processor."""

    def __init__(self, model: Any, processor: Any, template: str | None = None, max_new_tokens: int = 77):
        from ..templates import TEMPLATES, resolve_template_name

        self.model = model
        self.processor = processor
        self.template = template or processor.chat_template
        self.max_new_tokens = max_new_tokens
        if isinstance(self.template, str) and "{%" not in self.template:
            self.stop_strings = list(TEMPLATES[resolve_template_name(self.template)].stop_strings)
        else:
            self.stop_strings = list(getattr(processor, "stop_strings", None) or [])

    def prompt_text(self, prompt: str) -> str:
        from ..templates import render_chat

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return render_chat(messages, self.template, add_generation_prompt=True)

    def __call__(self, images: Sequence[Any], prompt: str) -> list[str]:
        import torch

        text = self.prompt_text(prompt)
        bos = self.processor.tokenizer.bos_token
        device = next(self.model.parameters()).device
        inputs = self.processor(
            images=list(images),
            text=[text] * len(images),
            padding=True,
            padding_side="left",  # generation continues every row at the same (last) column
            # The processor's rule: BOS from the tokenizer unless the template already wrote it (llama3).
            add_special_tokens=not (bos is not None and text.startswith(bos)),
            return_tensors="pt",
        )
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        inputs = {k: v.to(device=device, dtype=dtype if k == "pixel_values" else v.dtype) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        captions = []
        for row in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True):
            for stop in self.stop_strings:
                if stop.strip() and stop in row:  # "\n" (plain) would cut multi-line captions: keep those
                    row = row.split(stop, 1)[0]
            captions.append(row.strip())
        return captions


def caption_images(
    model: Any,
    processor: Any,
    paths: Sequence[str] | tuple[list[str], str],
    output: str | os.PathLike,
    prompt: str | None = None,
    style: str = "plain",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    image_root: str | os.PathLike | None = None,
    question: str | None = None,
    template: str | None = None,
    max_image_pixels: int | None = None,
    show_progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, int]:
    """Captions ``paths`` into ``output`` (see the module docstring); returns the counts (of every process).

    ``paths`` may be :func:`collect_images`' ``(paths, root)``; ``image_root`` (default that root, else the common
    folder of the paths) is what the written image paths are relative to. ``ranks``: this process's place in a
    multi-process run (default: from the launcher's environment, see `internvl_chat.data.sharding`); only the main
    process writes ``output``.
    """
    from tqdm.auto import tqdm

    from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image

    if style not in DEFAULT_PROMPTS:
        raise ValueError(f"style must be one of {sorted(DEFAULT_PROMPTS)}, got {style!r}")
    if isinstance(paths, tuple):
        paths, root = paths
        image_root = image_root or root
    paths = list(paths)
    if image_root is None:
        image_root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else "."
    prompt = prompt or DEFAULT_PROMPTS[style]
    human = "<image>" if style == "plain" else "<image>\n" + (question or prompt)
    captioner = Captioner(model, processor, template, max_new_tokens or DEFAULT_MAX_NEW_TOKENS[style])
    device = next(model.parameters()).device
    ranks = ranks or launch_state("cpu" if device.type == "cpu" else None)
    output = os.fspath(output)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    # This job's captions: OUTPUT.partial.jsonl (one process) and its .rankN parts (several), merged into OUTPUT at
    # the end; OUTPUT itself only holds finished jobs.
    store = ShardedJsonl(output + PARTIAL_SUFFIX, _record_key, ranks)
    previous = _read_records(output)
    job = store.read()
    done = {str(r.get("id")) for r in previous} | set(job)
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels

    # Content ids of every path, hashed in shares and gathered, so that every process agrees on which path of a
    # duplicated picture is captioned (the first, as one process would decide). The gather is also the point
    # after which nothing is read: appends start below.
    mine = shard(range(len(paths)), ranks.rank, ranks.world_size)
    hashed: dict[int, str | None] = {}
    for i in mine:
        try:
            hashed[i] = file_content_id(paths[i], ID_HEX)
        except OSError as err:
            logger.warning("unreadable image %s: %s", paths[i], err)
            hashed[i] = None
    if ranks.world_size > 1:
        for part in ranks.gather(hashed):
            hashed.update(part)
    stats: Counter = Counter(images=len(paths))
    first: dict[str, int] = {}  # content id -> position of its first path (the merge order)
    pending: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        key = hashed[i]
        if key is None:
            stats["unreadable"] += 1
        elif key in done or key in first:
            # [IMPORTANT] same content = same id: a renamed copy, or an image captioned by an earlier run.
            stats["duplicate"] += 1
            first.setdefault(key, i)
        else:
            first[key] = i
            pending.append((key, path))
    todo = shard(pending, ranks.rank, ranks.world_size)
    own: Counter = Counter()

    def flush(batch: list[tuple[str, str, Any]]) -> None:
        captions = captioner([image for _, _, image in batch], prompt)
        records = []
        for (key, path, _), caption in zip(batch, captions):
            if not caption:
                own["empty_caption"] += 1
                logger.warning("empty caption for %s; not written", path)
                continue
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(image_root))
            records.append(
                {
                    "id": key,
                    "image": rel,
                    "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
                }
            )
        store.append(records)
        own["captioned"] += len(records)
        bar.update(len(batch))  # counted once generated, so the bar does not reach 100 % before the last batch

    batch: list[tuple[str, str, Any]] = []
    bar = tqdm(total=len(todo), desc="captioning", unit="image", disable=not (show_progress and ranks.is_main))
    for key, path in todo:
        try:
            image = load_image(path, max_pixels=limit)
        except (OSError, ValueError, TypeError) as err:
            own["unreadable"] += 1
            logger.warning("unreadable image %s: %s", path, err)
            bar.update(1)
            continue
        batch.append((key, path, image))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    for counts in ranks.gather(dict(own)):
        stats.update(counts)

    def in_input_order(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        # Input order, whichever process (or earlier attempt) wrote a record; ids from another input list last.
        keys = sorted(records, key=lambda k: first.get(k, len(paths)))
        return [records[k] for k in keys]

    merged = store.finish(in_input_order)
    if merged is None:  # not the main process
        return dict(stats)
    # OUTPUT := its finished records + this job's (not already there: a job killed while writing OUTPUT).
    have = {str(r.get("id")) for r in previous}
    records = previous + [r for k, r in merged.items() if k not in have]
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if output.endswith(".jsonl"):
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
    os.replace(tmp, output)
    store.remove()
    stats["total_records"] = len(records)
    logger.info("caption: %s", dict(stats))
    return dict(stats)


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat caption", description=__doc__.splitlines()[0])
    parser.add_argument("images", help="image folder (recursive) or a text file with one image path per line")
    parser.add_argument("--model", required=True, help="captioning model folder")
    parser.add_argument("--output", required=True, help="LLaVA JSON (.json) or JSONL (.jsonl) to write / extend")
    parser.add_argument("--prompt", help="instruction given to the captioner (default depends on --style)")
    parser.add_argument("--style", default="plain", choices=sorted(DEFAULT_PROMPTS))
    parser.add_argument("--question", help="human turn written for --style detailed (default: the prompt)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="default 77 (plain) / 512 (detailed)")
    parser.add_argument("--image-root", help="folder the written image paths are relative to")
    parser.add_argument("--template", help="conversation template for the prompt (default: the model's)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32...")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..loading import load_model

    # Under torchrun / accelerate launch each process captions its share on its own device; the main one writes
    # OUTPUT (internvl_chat.data.sharding).
    ranks = launch_state(args.device)
    try:
        model, processor = load_model(args.model, dtype=args.dtype, device=ranks.device or args.device)
        stats = caption_images(
            model,
            processor,
            collect_images(args.images),
            args.output,
            prompt=args.prompt,
            style=args.style,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            image_root=args.image_root,
            question=args.question,
            template=args.template,
            ranks=ranks,
        )
    finally:
        close_process_group()
    if ranks.is_main:
        sys.stdout.write(json.dumps({"output": args.output, **stats}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
