"""A torch ``Dataset`` over normalised samples, with lazy image loading, for ``DataLoader`` worker pools.

    from torch.utils.data import DataLoader
    from internvl_chat.data import VisionChatDataset
    from internvl_chat.training.collator import VisionChatCollator

    dataset = VisionChatDataset.from_file("llava_v1_5_mix665k.json", image_folder="/data", on_error="raise")
    collator = VisionChatCollator(processor, max_length=2048, over_length="skip")
    dataset = dataset.drop_over_length(collator)          # optional: exact length filter before training
    loader = DataLoader(dataset, batch_size=16, num_workers=8, collate_fn=collator)
    dataset.modality_lengths   # LLaVA's group_by_modality_length input: +len for image samples, -len text-only
    dataset.stats              # {"loaded": ..., "skipped_image": ...}, counted across DataLoader workers

Items are ``{"id", "messages", "images": [PIL.Image RGB], "source"}`` (the normalised sample of
:mod:`internvl_chat.data.formats` with decoded images). Only paths are kept in memory; images are opened in
``__getitem__`` (so in the worker processes), with :func:`load_image`'s errors naming the file. A missing or corrupt
image raises :class:`DataError` with the sample id and source file, or with ``on_error="skip"`` is logged, counted
and replaced by the next good sample (the batch stays full, the order stays deterministic).

The items carry no tensors: tokenization (:mod:`internvl_chat.data.encoding`) and image preprocessing happen in the
collator (also in the workers), so the same dataset serves every template / image size.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..templates import drops_leading_assistant
from .formats import ON_ERROR, DataError, modality_length, read_samples, sample_images, word_length

logger = logging.getLogger(__name__)

__all__ = ["SharedCounters", "VisionChatDataset", "hf_view", "load_sample_images"]


class SharedCounters:
    """Named integer counters that DataLoader workers and the main process all see.

    Backed by a tensor in shared memory: forked workers inherit it, spawned workers receive it through torch's
    multiprocessing pickler, so counts made in ``__getitem__`` / ``collate_fn`` inside a worker are visible in the
    trainer process (plain ints would stay in the worker).

    # [IMPORTANT] increments are not atomic across processes; two workers counting the same event at the same
    # instant may lose one count. These counters feed logs, not control flow.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._values = torch.zeros(len(self.names), dtype=torch.int64).share_memory_()

    def add(self, name: str, n: int = 1) -> None:
        self._values[self._index[name]] += n

    def __getitem__(self, name: str) -> int:
        return int(self._values[self._index[name]])

    def as_dict(self) -> dict[str, int]:
        return {name: int(v) for name, v in zip(self.names, self._values.tolist())}

    def reset(self) -> None:
        self._values.zero_()

    def __repr__(self) -> str:
        return f"SharedCounters({self.as_dict()})"


def load_sample_images(sample: dict[str, Any], max_image_pixels: int | None = None) -> list[Any]:
    """Opens a sample's images (paths, bytes, ``{"bytes", "path"}`` dicts, PIL) as RGB PIL images.

    Raises :class:`DataError` (kind ``missing_image`` or ``corrupt_image``) naming the sample id, its source file
    and the image.
    """
    from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image

    limit = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    images = []
    for image in sample.get("images") or []:
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        try:
            images.append(load_image(image, max_pixels=limit))
        except (FileNotFoundError, IsADirectoryError) as err:
            raise DataError(str(err), sample.get("id"), sample.get("source"), "missing_image") from err
        except (OSError, ValueError, TypeError) as err:  # ImageLoadError is a ValueError; truncated files OSError
            raise DataError(str(err), sample.get("id"), sample.get("source"), "corrupt_image") from err
    return images


class VisionChatDataset(Dataset):
    """Map-style dataset over normalised samples; images are decoded lazily in ``__getitem__``.

    Args:
        samples: a sequence of normalised samples (``read_samples``' output, a list, or ``HFSamples``).
        on_error: ``"raise"`` (default): a missing / corrupt image raises :class:`DataError` with id and file;
            ``"skip"``: log, count in ``stats["skipped_image"]``, return the next good sample instead.
        load_images: ``False`` returns the samples with their image references unopened (length checks, tests).
        max_image_pixels: decompression-bomb guard passed to :func:`load_image` (``None``: its default).
        image_tokens_estimate: image tokens added to :attr:`lengths` per image sample (LLaVA uses 128).
    """

    def __init__(
        self,
        samples: Sequence[dict[str, Any]],
        on_error: str = "raise",
        load_images: bool = True,
        max_image_pixels: int | None = None,
        image_tokens_estimate: int = 128,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.samples = samples
        self.on_error = on_error
        self.load_images = load_images
        self.max_image_pixels = max_image_pixels
        self.image_tokens_estimate = image_tokens_estimate
        self.stats = SharedCounters(["loaded", "skipped_image"])
        self.read_stats: Counter = Counter()
        self._lengths: list[int] | None = None
        self._modality: list[int] | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        on_error: str = "raise",
        **kwargs: Any,
    ) -> VisionChatDataset:
        """Reads any supported format (:func:`read_samples`); ``on_error`` applies to records and images."""
        read_stats: Counter = Counter()
        samples = read_samples(path, image_folder=image_folder, on_error=on_error, stats=read_stats)
        dataset = cls(samples, on_error=on_error, **kwargs)
        dataset.read_stats = read_stats
        if read_stats:
            logger.warning("%s: skipped %d malformed records (%s)", path, read_stats["skipped"], dict(read_stats))
        logger.info("%s: %d samples", path, len(dataset))
        return dataset

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.load_images:
            return self.samples[index]
        attempts = min(len(self), 100)
        for step in range(attempts):
            sample = self.samples[(index + step) % len(self)]
            try:
                images = load_sample_images(sample, self.max_image_pixels)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                self.stats.add("skipped_image")
                logger.warning("skipping %s (%d skipped so far)", err, self.stats["skipped_image"])
                continue
            self.stats.add("loaded")
            return {**sample, "images": images}
        raise DataError(f"{attempts} consecutive samples from index {index} have bad images", index, "dataset")

    def to_hf_dataset(self):
        """The samples as a HF ``datasets.Dataset`` with undecoded image references (for TRL's ``SFTTrainer``,
        which accepts only HF datasets); the collator then opens the images in the DataLoader workers.

        # [IMPORTANT] on this route a bad image raises in the collator (with sample id and file); there is no skip
        # there, so run ``internvl-chat data check`` first, or build this dataset with ``on_error="skip"`` and
        # call :meth:`drop_bad_images` before converting.
        """
        from .formats import samples_to_hf_dataset

        return samples_to_hf_dataset(self.samples[i] for i in range(len(self.samples)))

    def leading_assistant_ids(self) -> list[Any]:
        """Ids of the samples whose first turn (after a system message) is the assistant's: every template drops
        that turn, as the original preprocessing does, so it is never trained on (counted in data check and the
        training summary)."""
        return [
            self.samples[i].get("id")
            for i in range(len(self.samples))
            if drops_leading_assistant(self.samples[i].get("messages") or [])
        ]

    def drop_bad_images(self, workers: int = 8) -> VisionChatDataset:
        """A copy without the samples whose images are missing or corrupt (each is opened once, in threads).

        Raises the first :class:`DataError` under ``on_error="raise"``; with ``"skip"`` logs them and counts them in
        ``read_stats["skipped_image"]``.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        def check(i):
            try:
                load_sample_images(self.samples[i], self.max_image_pixels)
            except DataError as err:
                return err
            return None

        keep, bad = [], 0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(check, range(len(self.samples)))
            for i, err in enumerate(tqdm(results, total=len(self), desc="images", disable=len(self) < 1000)):
                if err is None:
                    keep.append(i)
                    continue
                if self.on_error == "raise":
                    raise err
                bad += 1
                logger.warning("skipping %s", err)
        out = self._subset(keep)
        out.read_stats["skipped_image"] += bad
        return out

    def _subset(self, keep: list[int]) -> VisionChatDataset:
        out = VisionChatDataset(
            [self.samples[i] for i in keep],
            on_error=self.on_error,
            load_images=self.load_images,
            max_image_pixels=self.max_image_pixels,
            image_tokens_estimate=self.image_tokens_estimate,
        )
        out.read_stats = Counter(self.read_stats)
        return out

    # ------------------------------------------------------------------------------------------- lengths
    def _compute_lengths(self) -> None:
        lengths, modality = [], []
        for sample in self.samples:
            has_image = bool(sample_images(sample))
            lengths.append(word_length(sample) + (self.image_tokens_estimate if has_image else 0))
            modality.append(modality_length(sample))
        self._lengths, self._modality = lengths, modality

    @property
    def lengths(self) -> list[int]:
        """LLaVA's ``lengths``: :func:`~internvl_chat.data.formats.word_length` (words of all turns, ``<image>``
        included), plus ``image_tokens_estimate`` (LLaVA: 128) for image samples."""
        if self._lengths is None:
            self._compute_lengths()
        return self._lengths

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's ``modality_lengths`` for ``group_by_modality_length``: +words for image samples, -words else
        (:func:`~internvl_chat.data.formats.modality_length`; a text-only sample without words gives 0)."""
        if self._modality is None:
            self._compute_lengths()
        return self._modality

    def drop_over_length(self, encoder: Any) -> VisionChatDataset:
        """A copy without the samples longer than ``encoder.max_length`` (exact token count, images included).

        ``encoder``: a :class:`~internvl_chat.data.encoding.SampleEncoder` or the training collator (its encoder).

        Tokenizes every sample once (no image is opened); logs and returns the dataset with the survivors, and
        records the number dropped in ``read_stats["dropped_over_length"]``. Use with ``over_length="skip"`` when
        whole batches must stay full.
        """
        from tqdm.auto import tqdm

        keep = []
        for i in tqdm(range(len(self.samples)), desc="measuring lengths", disable=len(self.samples) < 1000):
            if encoder.max_length is None or encoder.encode(self.samples[i])["length"] <= encoder.max_length:
                keep.append(i)
        dropped = len(self.samples) - len(keep)
        if dropped:
            logger.warning("dropped %d of %d samples longer than %s tokens", dropped, len(self), encoder.max_length)
        out = self._subset(keep)
        out.read_stats["dropped_over_length"] += dropped
        return out


class _ItemsByIndex:
    """The ``with_transform`` of :func:`hf_view`: rows of ``index`` → the wrapped dataset's items (picklable, so
    spawned DataLoader workers get it too)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if "index" not in batch:  # a column read such as view["modality_length"] passes through
            return batch
        items = [self.dataset[int(i)] for i in batch["index"]]
        keys = list(dict.fromkeys(key for item in items for key in item))
        out = {key: [item.get(key) for item in items] for key in keys}
        for key, values in batch.items():
            if key != "index":
                out.setdefault(key, values)
        return out


def hf_view(dataset: Any, columns: dict[str, list[Any]] | None = None):
    """A map-style dataset as a HF ``datasets.Dataset`` of the same items, for trainers that accept only those
    (TRL's ``SFTTrainer``).

    The view holds an ``index`` column (plus ``columns``, e.g. ``{"modality_length": [...]}``); a
    ``with_transform`` returns ``dataset[index]`` on access, so items, lazy image decoding in the DataLoader
    workers and :class:`VisionChatDataset`'s ``on_error`` behave exactly as with the torch dataset itself.
    """
    import datasets

    data = {"index": list(range(len(dataset)))}
    for name, values in (columns or {}).items():
        if len(values) != len(dataset):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(dataset)} samples")
        data[name] = list(values)
    return datasets.Dataset.from_dict(data).with_transform(_ItemsByIndex(dataset))
