"""`internvl-chat push`: write a model card for a model folder and upload it to the Hugging Face Hub.

    internvl-chat push out/llava-7b --repo-id me/llava-v1.5-7b --license llama2 \
        --base-model liuhaotian/llava-v1.5-7b --dataset liuhaotian/LLaVA-Instruct-150K [--private] \
        [--revision BRANCH] [--eval-results out/llava-7b/eval_results.json] [--dry-run]

The card (`huggingface_hub.ModelCard`) carries `ModelCardData` metadata: library_name transformers, pipeline_tag
image-text-to-text, base_model, datasets, license, tags (incl. custom_code), and the eval results as `model-index`;
its body has the exact loading snippet with `trust_remote_code=True` and a pinned revision. The upload uses
`HfApi.create_repo` and two `create_commit`s: the model files first, then README.md whose snippet pins the commit
of those files (a card cannot name the commit it is part of).

Uploaded: model files only (weights as safetensors, JSON configs, remote code `*.py`, chat templates, tokenizer
files), walking the folder without following symlinks out of it. Left out, each with its reason in `--dry-run`:
hidden files and folders (`.env`, `.git`, `.cache`...), symlinks that point outside the folder and symlinked
folders, pickles (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`), optimizer / scheduler / RNG states,
`training_args.bin`, DeepSpeed `global_step*` folders and `checkpoint-*` folders of a run in progress, logs,
caches, and any other file that is not a model file. `--dry-run` prints the file plan and the card and touches no
network.

Eval results (`--eval-results`, default `DIR/eval_results.json` when present): either
`{"results": {"textvqa": {"accuracy": 58.2}, "pope": {"f1": 85.9}}}` (also without the "results" level) or a list
of `{"benchmark": "textvqa", "metric": "accuracy", "value": 58.2, "dataset": "lmms-lab/textvqa", "split": "val"}`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Never uploaded: pickled weights / states, training-run leftovers, caches. Matched against each path part.
EXCLUDE_PATTERNS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "*.ckpt",
    "*.partial",
    "*.tmp",
    "optimizer*",
    "scheduler*",
    "rng_state*",
    "training_args*",
    "trainer_state.json",
    "global_step*",
    "checkpoint-*",
    "latest",
    "zero_to_fp32.py",
    "runs",
    "wandb",
    "__pycache__",
    "README.md",  # written by us
)
# What a model folder holds (matched against the file name): only these are uploaded.
MODEL_FILES = (
    "*.safetensors",
    "*.json",
    "*.py",
    "*.jinja",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)
PIN_PLACEHOLDER = "<commit of the model files, filled in on upload>"


def _leaves_folder(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return True
    return False


def upload_plan(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files to upload, [(file or folder left out, why)]), as paths relative to `folder`."""
    folder = Path(folder)
    root = folder.resolve()
    keep, skip = [], []
    # [IMPORTANT] os.walk(followlinks=False) never enters a symlinked folder; a symlinked file is uploaded only when
    # its target is inside the folder, so a link to ~/.ssh or /etc never leaves the machine.
    for current, dirs, files in os.walk(folder, followlinks=False):
        here = Path(current)
        for name in sorted(dirs):
            rel = (here / name).relative_to(folder)
            reason = None
            if name.startswith("."):
                reason = "hidden folder"
            elif (here / name).is_symlink():
                reason = "symlinked folder, not followed"
            elif any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDE_PATTERNS):
                reason = "training-run leftover or cache"
            if reason:
                skip.append((rel, reason))
                dirs.remove(name)
        for name in sorted(files):
            path = here / name
            rel = path.relative_to(folder)
            if name.startswith("."):
                skip.append((rel, "hidden file"))
            elif path.is_symlink() and _leaves_folder(path, root):
                skip.append((rel, "symlink to a file outside the folder"))
            elif not path.is_file():
                skip.append((rel, "not a regular file"))
            elif any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDE_PATTERNS):
                skip.append((rel, "pickle, training state or written by push"))
            elif not any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES):
                skip.append((rel, "not a model file"))
            else:
                keep.append(rel)
    return sorted(keep), sorted(skip)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def eval_results(path: Path | None) -> list:
    """Our eval output → `huggingface_hub.EvalResult`s (task image-text-to-text, one per benchmark and metric)."""
    from huggingface_hub import EvalResult

    if path is None or not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("results", data)
    rows = []
    if isinstance(data, dict):
        for benchmark, metrics in data.items():
            metrics = metrics if isinstance(metrics, dict) else {"score": metrics}
            rows += [{"benchmark": benchmark, "metric": m, "value": v} for m, v in metrics.items()]
    elif isinstance(data, list):
        rows = data
    else:
        raise ValueError(f"{path}: expected a dict or a list of results, got {type(data).__name__}.")
    results = []
    for row in rows:
        if not isinstance(row.get("value"), (int, float)):
            continue  # per-category breakdowns and the like stay in the JSON file
        results.append(
            EvalResult(
                task_type="image-text-to-text",
                dataset_type=row.get("dataset", row["benchmark"]),
                dataset_name=row.get("name", row["benchmark"]),
                dataset_split=row.get("split"),
                metric_type=row["metric"],
                metric_value=row["value"],
            )
        )
    return results


def model_card(folder, repo_id, revision=None, base_model=None, datasets=None, license=None, results_path=None):
    """The `ModelCard` for `folder` (metadata + body with the pinned loading snippet)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    conversion = _read_json(folder / "conversion.json")
    vision = config.get("vision_config", {}).get("model_type", "?")
    text = config.get("text_config", {}).get("model_type", "?")
    template = config.get("template", conversion.get("template", "?"))
    tags = ["internvl-chat", "llava", "vision-language", "image-text-to-text", "custom_code", vision, text]
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model or None,
        datasets=datasets or None,
        license=license or "other",
        tags=list(dict.fromkeys(t for t in tags if t and t != "?")),
        eval_results=eval_results(results_path) or None,
    )
    pin = revision or PIN_PLACEHOLDER
    source = f"converted from a `{conversion['format']}` checkpoint" if conversion.get("format") else ""
    body = f"""
# {repo_id.split("/")[-1]}

A LLaVA-architecture vision-language model in the `internvl_chat_llava` format{", " + source if source else ""}:
vision tower `{vision}`, language model `{text}`, conversation template `{template}`,
{config.get("image_seq_length", "?")} image tokens per image.

## Use

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(
    "{repo_id}", revision="{pin}", trust_remote_code=True
)
processor = AutoProcessor.from_pretrained("{repo_id}", revision="{pin}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The revision pins the commit holding these weights and this code (`trust_remote_code` runs the code of that
commit only). Uploaded with `internvl-chat push`.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)


def push(
    folder,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    base_model=None,
    datasets=None,
    license=None,
    results_path=None,
    token=None,
) -> dict:
    """Uploads `folder` to `repo_id`; returns {"files": [...], "skipped": [...], "card": str, "commit": sha}."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} not found: push expects a saved model folder.")
    if results_path is None and (folder / "eval_results.json").is_file():
        results_path = folder / "eval_results.json"
    files, skipped = upload_plan(folder)
    card_args = dict(base_model=base_model, datasets=datasets, license=license, results_path=results_path)
    result = {
        "repo_id": repo_id,
        "files": [str(p) for p in files],
        "skipped": [{"path": str(p), "reason": why} for p, why in skipped],
    }
    if dry_run:
        result["card"] = str(model_card(folder, repo_id, None, **card_args))
        return result

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.as_posix(), path_or_fileobj=str(folder / p)) for p in files]
    logger.info("uploading %d files to %s", len(files), repo_id)
    files_commit = api.create_commit(
        repo_id, operations, commit_message="Upload model (internvl-chat push)", revision=revision
    )
    card = model_card(folder, repo_id, files_commit.oid, **card_args)
    card_commit = api.create_commit(
        repo_id,
        [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())],
        commit_message="Add model card (internvl-chat push)",
        revision=revision,
    )
    result.update(card=str(card), commit=files_commit.oid, card_commit=card_commit.oid, url=card_commit.commit_url)
    return result


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat push", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="model folder to upload")
    parser.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    parser.add_argument("--dry-run", action="store_true", help="print the file plan and the card, upload nothing")
    parser.add_argument("--base-model", action="append", help="base model id(s) for the card (repeatable)")
    parser.add_argument("--dataset", action="append", help="training dataset id(s) for the card (repeatable)")
    parser.add_argument("--license", help="license id for the card (default: other)")
    parser.add_argument("--eval-results", help="eval results JSON (default: FOLDER/eval_results.json)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = push(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        base_model=args.base_model,
        datasets=args.dataset,
        license=args.license,
        results_path=args.eval_results,
    )
    if args.dry_run:
        lines = [f"would upload {len(result['files'])} files to {args.repo_id}:"]
        lines += [f"  + {p}  ({(Path(args.folder) / p).stat().st_size} bytes)" for p in result["files"]]
        lines += [f"  - {s['path']}  (left out: {s['reason']})" for s in result["skipped"]]
        print("\n".join(lines) + "\n\n" + result["card"])
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "card"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
