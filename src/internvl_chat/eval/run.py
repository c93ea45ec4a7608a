"""`internvl-chat eval`: run one benchmark with the published protocol, score it, write the report.

    internvl-chat eval --model DIR --task textvqa --data llava_textvqa_val_v051_ocr.jsonl \
        --image-folder textvqa/train_images --annotations TextVQA_0.5.1_val.json --batch-size 16
    internvl-chat eval --model DIR --task mmbench --data mmbench_dev_20230712.tsv --compare seed
    internvl-chat eval --list-tasks

Outputs under ``--output`` (default ``eval_results/<model folder name>``): ``<task>/predictions.jsonl`` (LLaVA
answer-file fields; resumable), ``<task>/scores.json``, submission files for the server-scored splits
(``<task>/submission_*``), and the shared ``scores.json`` / ``report.md`` / ``scores.png``. Protocol: the model's
chat template (``--template`` to override), greedy decoding, the task's prompt suffix and max new tokens
(``--max-new-tokens`` to override); ``--fast-decode`` decodes through the static-cache `FastGreedyDecoder` instead
of ``model.generate`` (faster on a GPU; same answers up to fp16 near-ties, see ``internvl_chat.eval.runner``). Task
options: ``--option key=value`` (e.g. ``protocol=vqa_eval`` for ``vqav2``, ``variant=internvl`` for ``chartqa``,
``metric=contains`` for ``docvqa``, ``metric=fscore`` for ``funsd`` / ``sroie``, ``rotate=true`` /
``extract=llava`` / ``verbose=true`` / ``judge=true`` for ``mmbench``, ``failed=random`` for ``scienceqa``,
``all=true`` for ``seed``). Judged tasks read the judge endpoint from the environment (see
``internvl_chat.eval.judge``); a judge that keeps failing ends the run with one line naming the item (finished
judgements are cached: rerun to resume).
``--trust-remote-code`` lets a model folder of another model type run its own code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from ..data.sharding import log_level
from .report import SEED_SCORES, reference_name, update_scores, write_report
from .tasks import TASKS, TaskContext, ensure_unique_keys, get_task

logger = logging.getLogger(__name__)


def _parse_options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def evaluate(
    task_name: str,
    data: str,
    model_dir: str | None = None,
    image_folder: str | None = None,
    annotations: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    template: str | None = None,
    split: str | None = None,
    options: dict | None = None,
    num_workers: int = 4,
    device: str | None = None,
    dtype: str = "auto",
    compare: str | None = None,
    reference: str | None = None,
    fast_decode: bool = False,
    trust_remote_code: bool = False,
    model=None,
    processor=None,
    judge=None,
) -> dict:
    """Reads, generates (only what is missing), scores, writes submission + report; returns the task result."""
    task = get_task(task_name)
    name = Path(model_dir).name if model_dir else "model"
    output = Path(output or os.path.join("eval_results", name))
    task_dir = output / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    ctx = TaskContext(
        data, image_folder, annotations, split, {**task.options, **(options or {})}, output=str(task_dir)
    )
    samples = ensure_unique_keys(task.read(ctx))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise SystemExit(f"No questions read from {data} for task {task.name}")
    logger.info("%s: %d questions from %s", task.name, len(samples), data)

    from ..data.sharding import launch_state, ordered_by
    from .runner import generate_predictions, prediction_store

    # Under torchrun / accelerate launch every process answers its share; the main process merges, scores and
    # reports (internvl_chat.data.sharding). A plain run is process 0 of 1.
    ranks = launch_state(device)
    store = prediction_store(task_dir / "predictions.jsonl", ranks)
    stats = {"questions": 0}
    order = ordered_by([s.key for s in samples])
    # Every process reads the same files here: nothing is written before generate_predictions' first barrier.
    done = store.read()
    if any(s.key not in done for s in samples):
        if model is None:
            if not model_dir:
                raise SystemExit("--model is needed: some questions have no prediction yet")
            from .runner import load_model

            model, processor = load_model(
                model_dir, device=ranks.device or device, dtype=dtype, trust_remote_code=trust_remote_code
            )
        start = time.perf_counter()
        _, stats = generate_predictions(
            model,
            processor,
            samples,
            task_dir / "predictions.jsonl",
            batch_size=batch_size,
            max_new_tokens=max_new_tokens or task.max_new_tokens,
            num_workers=num_workers,
            template=template,
            model_id=name,
            desc=task.name,
            fast_decode=fast_decode,
            ranks=ranks,
        )
        stats["wall_seconds"] = time.perf_counter() - start
        records = store.read() if ranks.is_main else None  # generate_predictions ended with the merge
    else:
        records = store.finish(order)  # parts a killed run left, or a finished file to re-score
    if records is None:  # not the main process: its answers are merged; scoring and reports are the main's
        return {}
    preds = {k: r["text"] for k, r in records.items()}

    # MMBench-style tasks ask a judge only on request (--option judge=true), as VLMEvalKit's exact_matching default.
    wants_judge = task.judged or str(ctx.options.get("judge", "false")).lower() in ("1", "true", "yes")
    if wants_judge and judge is None:
        from .judge import JudgeClient

        judge = JudgeClient.from_env(
            cache_path=task_dir / "judge_cache.jsonl", default_model=task.judge_model or "gpt-4-0613"
        )
    ctx.judge = judge
    ctx.answers = records
    result = task.score(samples, preds, ctx)
    if task.submission is not None:
        try:
            result["submission"] = task.submission(samples, preds, ctx, str(task_dir))
        except ValueError as err:  # e.g. a --limit run cannot make a full upload file
            logger.warning("%s: no submission file (%s)", task.name, err)
    if stats.get("questions"):
        # Timings live apart from the scores so that reruns reproduce scores.json byte for byte.
        (task_dir / "speed.json").write_text(json.dumps(stats, indent=2) + "\n")
    (task_dir / "scores.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    reference = reference or reference_name(model_dir)
    if compare == "seed" and reference not in SEED_SCORES:
        logger.warning(
            "--compare seed: %s was not built from a preset; pass --reference NAME (one of %s)",
            model_dir,
            ", ".join(sorted(SEED_SCORES)),
        )
    update_scores(output, task.name, result, model=name, reference=reference)
    paths = write_report(output, compare, reference)
    result["report"] = paths["markdown"]
    return result


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (ours or converted); not needed to re-score finished runs")
    parser.add_argument("--task", choices=sorted(TASKS), help="benchmark (see --list-tasks)")
    parser.add_argument("--data", help="question file / TSV / parquet / saved dataset / benchmark folder")
    parser.add_argument("--image-folder", help="folder the image paths of the data are relative to")
    parser.add_argument("--annotations", help="ground-truth file or folder (see the task's reader)")
    parser.add_argument("--output", help="output folder (default eval_results/<model name>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, help="override the task's generation length")
    parser.add_argument("--template", help="conversation template name (default: the model's chat template)")
    parser.add_argument("--split", help="split of a saved DatasetDict / ScienceQA pid_splits")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding threads")
    parser.add_argument(
        "--fast-decode",
        action="store_true",
        help="greedy decoding with the static-cache, compiled FastGreedyDecoder instead of model.generate",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder of another model type to run its own code (ours never needs it)",
    )
    parser.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    parser.add_argument("--compare", choices=["seed"], help="report the seeds' published numbers beside ours")
    parser.add_argument("--reference", choices=sorted(SEED_SCORES), help="seed model to compare with")
    parser.add_argument("--list-tasks", action="store_true", help="print the tasks and exit")
    return parser


def _evaluate_args(args) -> dict:
    return evaluate(
        args.task,
        args.data,
        model_dir=args.model,
        image_folder=args.image_folder,
        annotations=args.annotations,
        output=args.output,
        batch_size=args.batch_size,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        split=args.split,
        options=_parse_options(args.option),
        num_workers=args.num_workers,
        device=args.device,
        dtype=args.dtype,
        compare=args.compare,
        reference=args.reference,
        fast_decode=args.fast_decode,
        trust_remote_code=args.trust_remote_code,
    )


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=log_level(), format="%(message)s")
    if args.list_tasks:
        for task in TASKS.values():
            print(f"{task.name:<16} {task.family:<8} {task.description}")
        return 0
    if not args.task or not args.data:
        raise SystemExit("--task and --data are required (see --list-tasks)")
    # A JudgeError (one line naming the item and how to resume) is a user error for `internvl-chat`: no traceback.
    try:
        result = _evaluate_args(args)
    finally:
        from ..data.sharding import close_process_group

        close_process_group()
    if not result:  # a process other than the main one of a multi-process run
        return 0
    summary = {k: result[k] for k in ("main", "metric", "count", "submission", "report") if k in result}
    print(json.dumps({"task": args.task, **summary}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
