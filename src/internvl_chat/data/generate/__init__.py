"""Training-data generation through any OpenAI-compatible endpoint (`internvl-chat data generate`): ShareGPT4V-style
detailed captions per image source, LLaVAR-2's Hybrid-Instruct detail-enriched captions (human caption + OCR text)
and extractive QA pairs each followed by a self-explain pair, written as LLaVA conversations.

    internvl-chat data generate captions images/ --output caps.json --base-url URL --model NAME
    internvl-chat data generate enrich caps.json --output rich.json --ocr-engine rapidocr --base-url URL --model NAME
    internvl-chat data generate qa enriched.json --output qa.json --num-qa 3 --base-url URL --model NAME
    internvl-chat data generate prompts my-prompts/          # copy the shipped prompt files to edit them

Modules: :mod:`.prompts` (the editable prompt files), :mod:`.api` (client, retries, rate limits, repair),
:mod:`.checks` (reply schemas, the extractive rule), :mod:`.ocr` (OCR field / RapidOCR), :mod:`.run` (steps,
journal and resume, output, summary, dry run). Nothing here imports torch until an image is opened.
"""

import importlib

_EXPORTS = {
    "GenerateConfig": "run",
    "load_prompts": "prompts",
    "export_prompts": "prompts",
    "is_extractive": "checks",
    "normalize": "checks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
