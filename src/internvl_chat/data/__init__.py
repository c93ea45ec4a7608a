"""Training data: readers for LLaVA JSON / HF datasets / InternVL meta files, a lazy-loading torch Dataset, checks.

    from internvl_chat.data import VisionChatDataset, read_samples, convert, DataError

    dataset = VisionChatDataset.from_file("llava.json", image_folder="images/")   # items: id, messages, images, source
    convert("llava.json", "llava.parquet", to="parquet")

`internvl-chat data check FILE --image-folder DIR` and `internvl-chat data convert IN OUT --to ...` are the CLI
(:mod:`internvl_chat.data.cli`); the collator that turns items into batches is
:class:`internvl_chat.training.collator.VisionChatCollator`.
"""

from .dataset import SharedCounters, VisionChatDataset, load_sample_images
from .formats import DataError, convert, read_samples, validate_sample

__all__ = [
    "DataError",
    "SharedCounters",
    "VisionChatDataset",
    "convert",
    "load_sample_images",
    "read_samples",
    "validate_sample",
]
