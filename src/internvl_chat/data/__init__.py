"""Training data: readers for LLaVA JSON / HF datasets / InternVL meta files, a lazy-loading torch Dataset, sample
encoding (tokens + labels, length policy), checks.

    from internvl_chat.data import VisionChatDataset, read_samples, convert, DataError

    dataset = VisionChatDataset.from_file("llava.json", image_folder="images/")   # items: id, messages, images, source
    convert("llava.json", "llava.parquet", to="parquet")

`internvl-chat data check FILE --image-folder DIR` and `internvl-chat data convert IN OUT --to ...` are the CLI
(:mod:`internvl_chat.data.cli`). :class:`~internvl_chat.data.encoding.SampleEncoder` turns one sample into
``input_ids`` / ``labels`` (the training collator, ``data check`` and the scorer share it); batching, padding and
packing are the training collator's (:class:`internvl_chat.training.collator.VisionChatCollator`).
"""

import importlib

# name -> submodule; imported on first use, so the CLI verbs under data/ parse their arguments before torch loads
_EXPORTS = {
    "DataError": "formats",
    "SampleEncoder": "encoding",
    "SharedCounters": "dataset",
    "VisionChatDataset": "dataset",
    "convert": "formats",
    "load_sample_images": "dataset",
    "read_samples": "formats",
    "validate_sample": "formats",
}

__all__ = [
    "DataError",
    "SampleEncoder",
    "SharedCounters",
    "VisionChatDataset",
    "convert",
    "load_sample_images",
    "read_samples",
    "validate_sample",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
