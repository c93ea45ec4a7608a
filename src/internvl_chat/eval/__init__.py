"""Evaluation on the seed benchmarks with the published protocol: batched, resumable, scored like the originals.

    internvl-chat eval --model DIR --task textvqa --data llava_textvqa_val_v051_ocr.jsonl --image-folder IMGS \
        --annotations TextVQA_0.5.1_val.json --batch-size 16 --compare seed

Modules: `metrics` (pure scorers), `tasks` (registry: readers, prompts, scorers, submission writers), `runner`
(batched generation), `judge` (OpenAI-compatible judge for MM-Vet / LLaVA-Bench), `report` (scores.json, markdown,
chart), `run` (the CLI verb).
"""
