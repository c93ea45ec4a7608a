"""The format registry (a plain dict: format → detector and planner; detection runs in this order) and the
`convert` entry point that runs detection, the format's planner and the writer."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from . import internvl, llava, llava_hf, llava_hr, lora, stage1
from .common import ConversionError, ConvertOptions, Plan
from .writer import write_model

logger = logging.getLogger(__name__)


class Format(NamedTuple):
    detect: Callable[[Path, ConvertOptions], tuple[bool, str]]  # (matches, why not)
    plan: Callable[[Path, ConvertOptions], Plan]


# A new source format is one module with `detect` and `plan`, and one row here.
FORMATS: dict[str, Format] = {
    "lora": Format(lora.detect, lora.plan),
    "stage1": Format(stage1.detect, stage1.plan),
    "llava-hf": Format(llava_hf.detect, llava_hf.plan),
    "sharegpt4v": Format(llava.detect_sharegpt4v, llava.plan_sharegpt4v),
    "llava-hr": Format(llava_hr.detect, llava_hr.plan),
    "internvl": Format(internvl.detect, internvl.plan),
    "llava": Format(llava.detect, llava.plan),
}


def detect_format(src, options: ConvertOptions | None = None) -> str:
    src, options = Path(src), options or ConvertOptions()
    for name, fmt in FORMATS.items():
        if fmt.detect(src, options)[0]:
            return name
    raise ConversionError(
        f"Cannot tell the checkpoint format of {src} (looked at config.json, adapter_config.json, mm_projector.bin "
        f"and the weight names); pass --from with one of {', '.join(FORMATS)}."
    )


def convert(src, dst, options: ConvertOptions | None = None, **fields) -> dict:
    """Converts `src` into `dst` (which must not exist or be empty); returns the conversion summary.

    `options` (a `ConvertOptions`), or its fields as keyword arguments: `convert(src, dst, model_base=base)`.
    """
    unknown = set(fields) - ConvertOptions.names()
    if unknown:
        raise TypeError(f"convert() got unknown options {sorted(unknown)}; see ConvertOptions.")
    options = dataclasses.replace(options or ConvertOptions(), **fields)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"Source folder {src} does not exist.")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"Output folder {dst} is not empty.")
    fmt = options.fmt
    if fmt is None:
        fmt = detect_format(src, options)
        logger.info("detected format: %s", fmt)
    elif fmt not in FORMATS:
        raise ConversionError(f"Unknown --from {fmt!r}; formats: {', '.join(FORMATS)}.")
    else:
        ok, why = FORMATS[fmt].detect(src, options)
        if not ok:
            raise ConversionError(f"{src} does not look like a {fmt!r} checkpoint: {why} (see {src / 'config.json'}).")
    plan = FORMATS[fmt].plan(src, options)
    created = not dst.exists()
    try:
        info = write_model(
            plan, dst, dtype=options.dtype, max_shard_size=options.max_shard_size, allow_unknown=options.allow_unknown
        )
        if plan.adapter is not None:
            lora.write_adapter(dst, plan.adapter)
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    info.update(source=str(src), output=str(dst))
    return info
