"""`internvl-chat data`: check a training file, convert it (LLaVA JSON / datasets / parquet) or generate data.

    internvl-chat data check llava.json --image-folder images/ --model out/llava          # processor of a model
    internvl-chat data check llava.json --image-folder images/ --tokenizer DIR --template vicuna_v1 \
        --image-seq-length 576 --max-length 2048 --plot lengths.png --json report.json
    internvl-chat data convert llava.json llava.parquet --to parquet      # or --to datasets (a folder), llava
    internvl-chat data generate captions images/ --output caps.json --base-url URL --model NAME   # + enrich, qa

`check` exits with 1 when a sample would be rejected by training (missing / corrupt image, `<image>` count
mismatch, empty conversation, unknown role, no answer, unbuildable labels), else 0; empty turns are warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# check / encoding / formats are imported inside the commands: check pulls in torch (the image loader), and
# `--help` should answer at once.


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl-chat data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="report bad records / images and the token-length histogram")
    check.add_argument("file", help="LLaVA .json/.jsonl, InternVL meta .json, datasets folder or .parquet")
    check.add_argument("--image-folder", default=None, help="folder that relative image paths are joined to")
    check.add_argument("--model", default=None, help="model / processor folder (tokenizer, template, image tokens)")
    check.add_argument("--tokenizer", default=None, help="tokenizer folder (with --template) instead of --model")
    check.add_argument("--template", default=None, help="template name (default: the processor's chat template)")
    check.add_argument(
        "--image-seq-length", type=int, default=None, help="image tokens per image (default: model's, else 576)"
    )
    check.add_argument("--max-length", type=int, default=None, help="limit (default: tokenizer.model_max_length)")
    check.add_argument("--no-images", action="store_true", help="skip opening the images (structure only)")
    check.add_argument("--workers", type=int, default=4, help="threads decoding images")
    check.add_argument("--plot", default=None, help="write the length histogram PNG here")
    check.add_argument("--json", default=None, help="write the full report as JSON here")
    check.add_argument("--examples", type=int, default=5, help="examples printed per issue kind")

    conv = sub.add_parser("convert", help="convert between llava JSON/JSONL, datasets folder and parquet")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--to", required=True, choices=["llava", "datasets", "parquet"])
    conv.add_argument("--skip-bad", action="store_true", help="drop malformed records (counted) instead of failing")

    _add_generate(sub)
    return parser


GENERATE_HELP = {
    "captions": "image -> detailed caption (ShareGPT4V-style), a prompt per image source",
    "enrich": "image + human caption + OCR text -> detail-enriched caption (LLaVAR-2)",
    "qa": "caption + OCR -> extractive QA pairs, each followed by a self-explain pair (LLaVAR-2)",
}


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate captions / enriched captions / QA data through an OpenAI-compatible endpoint",
        description="Generate training data through any OpenAI-compatible endpoint (docs/data-generation.md).",
    )
    steps = gen.add_subparsers(dest="step", required=True)
    for step, help_ in GENERATE_HELP.items():
        p = steps.add_parser(step, help=help_, description=help_)
        p.add_argument(
            "input",
            help="records (.json / .jsonl)"
            + (", an image folder or a list of image paths" if step == "captions" else ""),
        )
        p.add_argument(
            "--output", required=True, help="output .json (a list) or .jsonl; + .journal.jsonl, .summary.json"
        )
        p.add_argument(
            "--image-folder", default=None, help="folder relative image paths are joined to (default: the input's)"
        )
        p.add_argument("--model", required=True, help="model name at the endpoint (e.g. gpt-4o)")
        p.add_argument(
            "--base-url",
            default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for internvl-chat serve "
            "(default: $OPENAI_BASE_URL or OpenAI's)",
        )
        p.add_argument(
            "--api-key-env",
            default="OPENAI_API_KEY",
            help="environment variable holding the API key (default: %(default)s)",
        )
        p.add_argument(
            "--prompts", default=None, help="folder of edited prompt files (STEP/SOURCE.txt; see 'prompts')"
        )
        p.add_argument(
            "--source", default="natural", help="prompt of records without a source field (default: natural)"
        )
        p.add_argument("--source-field", default="source", help="record field naming the image source")
        if step != "captions":
            p.add_argument(
                "--caption-field", default="caption", help="record field with the caption (else the first answer)"
            )
            p.add_argument(
                "--ocr-field", default="ocr", help="record field with OCR text (a string or a list of lines)"
            )
            p.add_argument(
                "--ocr-engine",
                choices=["none", "rapidocr"],
                default="none",
                help="run OCR where a record has no OCR field (rapidocr: the 'ocr' extra)",
            )
        if step == "qa":
            p.add_argument("--num-qa", type=int, default=3, help="extractive QA pairs asked per record (default: 3)")
        else:
            p.add_argument(
                "--question",
                default="Describe this image in detail.",
                help="the human turn of the written conversation (after <image>)",
            )
        p.add_argument(
            "--send-image",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="send the image with the prompt (default: yes for captions / enrich, no for qa)",
        )
        p.add_argument("--image-detail", choices=["auto", "low", "high"], default="auto", help="image_url detail")
        p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
        p.add_argument("--rpm", type=float, default=None, help="requests-per-minute limit")
        p.add_argument("--tpm", type=float, default=None, help="tokens-per-minute limit (estimated before each call)")
        p.add_argument("--max-retries", type=int, default=5, help="SDK retries of 429 / 5xx / timeouts (default: 5)")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
        p.add_argument("--max-tokens", type=int, default=None, help="reply token limit per call")
        p.add_argument(
            "--temperature", type=float, default=None, help="sampling temperature (default: the endpoint's)"
        )
        p.add_argument("--json-mode", action="store_true", help="send response_format json_object (OpenAI, vLLM...)")
        p.add_argument("--retry-failed", action="store_true", help="try again every failed record of the journal")
        p.add_argument(
            "--dry-run", action="store_true", help="print the number of calls and a token estimate; no call"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    prompts = steps.add_parser("prompts", help="copy the shipped prompt files to a folder to edit them")
    prompts.add_argument("folder")
    prompts.add_argument("--overwrite", action="store_true", help="replace files that exist")


def _encoder(args):
    from .encoding import SampleEncoder

    if args.model:
        from ..modeling import InternVLChatProcessor

        processor = InternVLChatProcessor.from_pretrained(args.model)
        if args.image_seq_length:
            processor.image_seq_length = args.image_seq_length
        return SampleEncoder(processor, template=args.template, max_length=args.max_length, over_length="skip")
    if args.tokenizer:
        from transformers import AutoTokenizer

        if not args.template:
            raise SystemExit("--tokenizer needs --template (e.g. vicuna_v1, plain, phi3_instruct, llama3)")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return SampleEncoder.from_tokenizer(
            tokenizer, args.template, args.image_seq_length or 576, args.max_length, over_length="skip"
        )
    return None


def _check(args) -> int:
    encoder = _encoder(args)
    from .check import check_file

    report = check_file(
        args.file,
        image_folder=args.image_folder,
        encoder=encoder,
        verify_images=not args.no_images,
        workers=args.workers,
    )
    sys.stdout.write(report.format(examples=args.examples) + "\n")
    if encoder is None:
        sys.stdout.write("(no --model / --tokenizer: token lengths not computed)\n")
    if args.plot:
        report.plot(args.plot)
        sys.stdout.write(f"wrote {args.plot}\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
        sys.stdout.write(f"wrote {args.json}\n")
    return 1 if report.errors else 0


def _convert(args) -> int:
    from .formats import convert

    n = convert(args.input, args.output, to=args.to, on_error="skip" if args.skip_bad else "raise")
    sys.stdout.write(f"wrote {n} samples to {args.output} ({args.to})\n")
    return 0


def _generate(args) -> int:
    if args.step == "prompts":
        from .generate.prompts import export_prompts

        written = export_prompts(args.folder, overwrite=args.overwrite)
        sys.stdout.write(f"wrote {len(written)} prompt file(s) under {args.folder}\n")
        return 0
    from .generate.run import GenerateConfig, run, summary_path

    for name in ("httpx", "httpx2", "httpcore", "openai"):  # one line per request would bury the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)

    cfg = GenerateConfig(
        step=args.step,
        input=args.input,
        output=args.output,
        base_url=args.base_url,
        model=args.model,
        api_key_env=args.api_key_env,
        image_folder=args.image_folder,
        prompts=args.prompts,
        source=args.source,
        source_field=args.source_field,
        caption_field=getattr(args, "caption_field", "caption"),
        ocr_field=getattr(args, "ocr_field", "ocr"),
        ocr_engine=getattr(args, "ocr_engine", None),
        num_qa=getattr(args, "num_qa", 3),
        question=getattr(args, "question", "Describe this image in detail."),
        send_image=args.send_image,
        image_detail=args.image_detail,
        concurrency=args.concurrency,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_retries=args.max_retries,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        json_mode=args.json_mode,
        retry_failed=args.retry_failed,
        dry_run=args.dry_run,
        progress=not args.no_progress,
    )
    summary = run(cfg)
    if not args.dry_run:
        tokens = summary["tokens"][args.step]
        sys.stdout.write(
            f"{args.step}: {summary['records_out']} of {summary['records_in']} record(s) written to {args.output}; "
            f"failed {summary['failed'] or 0}, rejected {summary['rejected'] or 0}, duplicates "
            f"{summary['duplicates'] or 0}; {tokens['calls']} call(s), {tokens['total_tokens']:,} tokens\n"
            f"summary: {summary_path(args.output)}\n"
        )
    return 0


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .formats import DataError

    try:
        if args.command == "generate":
            return _generate(args)
        return _check(args) if args.command == "check" else _convert(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
