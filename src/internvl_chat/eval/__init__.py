"""Evaluation on the seed benchmarks with the published protocol: batched, resumable, scored like the originals.

    internvl-chat eval --model DIR --task textvqa --data llava_textvqa_val_v051_ocr.jsonl --image-folder IMGS \
        --annotations TextVQA_0.5.1_val.json --batch-size 16 --compare seed

Modules: `metrics` (pure scorers), `tasks` (the registry, a plain dict, over one module per benchmark family with
their readers, prompts, scorers and submission writers, and the shared file I/O), `runner` (batched generation),
`judge` (OpenAI-compatible judge for MM-Vet / LLaVA-Bench, through the `openai` SDK), `report` (scores.json,
markdown, chart), `run` (the CLI verb). User guide: docs/evaluation.md.
"""
