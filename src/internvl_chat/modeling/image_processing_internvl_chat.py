"""Image processor for InternVL-Chat / LLaVA-style vision-language models: PIL images / arrays -> ``pixel_values``.

`InternVLChatImageProcessor` turns images into the `pixel_values` tensor `(N, 3, crop, crop)` (float32) that the
vision tower expects. It reproduces LLaVA-1.5's preprocessing bit for bit:

* mode: every image becomes 8-bit RGB first. By default transparency is dropped exactly as LLaVA's
  ``PIL.Image.convert("RGB")`` drops it (RGBA, LA, PA, P or L with a transparency entry: the colour under a
  transparent pixel is kept). ``alpha_background=[r, g, b]`` (saved in ``preprocessor_config.json``) composites
  such images onto that colour instead, for models trained that way. See `to_rgb`.
* ``image_aspect_ratio="pad"`` (LLaVA-1.5 finetune and eval, the default): the image is pasted centred on a square
  canvas of side ``max(w, h)`` filled with ``tuple(int(m * 255) for m in image_mean)`` -- (122, 116, 104) for the
  CLIP mean, (123, 116, 103) for the ImageNet mean -- at the floor-division offsets of LLaVA's ``expand2square``;
  then the CLIP processing: resize the shortest edge to ``size`` (bicubic), centre-crop to ``crop_size``, rescale by
  ``1/255``, normalize with ``image_mean`` / ``image_std``. The PIL backend never builds the ``max(w, h)²`` canvas:
  it runs PIL's two resize passes on the parts that hold image pixels (same arithmetic, identical bytes), so a
  32768x512 image costs ``size x 32768`` pixels instead of 32768².
* ``image_aspect_ratio="square"`` (stage-1 pretraining, the web demo's "Crop"): the CLIP processing alone.
* ``image_aspect_ratio="resize"`` (the web demo's "Resize"): stretch to ``size x size`` (bicubic), then the same
  centre crop (a no-op when ``crop_size == size``), rescale and normalize.

Memory guard: ``max_image_pixels`` bounds both the decoded image (width x height) and the largest buffer that
preprocessing allocates (`preprocess_pixels`: the padded canvas with the torchvision backend, the intermediate of
the resize passes otherwise -- extreme aspect ratios make these much larger than the image). Beyond it
`ImageTooLargeError` is raised before anything is allocated; `check_image_size` runs the same check from an image's
header size.

With ``backend="pil"`` (default) the tensors equal those of transformers' ``CLIPImageProcessorPil`` (PIL flavour of
``CLIPImageProcessor``) to within 1e-6. ``backend="torchvision"`` resizes with ``torchvision.transforms.v2`` like the
torchvision-flavoured ``CLIPImageProcessor`` (also to within 1e-6). Its bicubic differs from PIL's: for "pad" and
"square" (same scale on both axes) by at most 1-2 uint8 levels (max |diff| 0.015-0.035, mean ~1e-4 after CLIP
normalisation, 336-768 px); for "resize" with a non-square input (upscale on one axis, downscale on the other)
high-contrast content can differ by up to ~20-30 levels at isolated pixels (max |diff| ~0.4, mean ~5e-3 on noise),
because PIL clips to uint8 between its two passes. Train and evaluate with the same backend; the PIL one is the
reference (LLaVA used PIL). If torchvision is missing the PIL backend is used. [IMPORTANT] the saved ``backend`` is
what `AutoImageProcessor.from_pretrained(..., backend=...)` keeps: that kwarg is consumed by the Auto class; set
``processor.backend`` after loading or pass ``backend=`` per call instead.

Inputs are PIL images (any mode), numpy arrays (HWC or HW; uint8, uint16, bool or float in [0, 1]) or torch tensors
(CHW or HW), one at a time, as a list, or as a nested list (a batch of lists, flattened in order). Strings (paths,
URLs) are opened by transformers' ``load_image`` (`fetch_images`), which applies EXIF orientation and its own
``convert("RGB")`` -- so `alpha_background` cannot act on them; pass decoded images to keep the alpha channel.
Loading files, URLs, base64 and bytes safely is not this file's job (the ``internvl_chat`` package does it in
``internvl_chat.data.images``).

Usage::

    from image_processing_internvl_chat import InternVLChatImageProcessor

    proc = InternVLChatImageProcessor(size=336, image_aspect_ratio="pad")      # CLIP-L/336 tower
    proc = InternVLChatImageProcessor(size=448, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)  # InternViT-448
    pixel_values = proc([pil_image, array], return_tensors="pt")["pixel_values"]  # (2, 3, 336, 336)
    proc.save_pretrained("ckpt")  # preprocessor_config.json; InternVLChatImageProcessor.from_pretrained("ckpt")

This file is copied flat into saved checkpoints as remote code: it imports only numpy, PIL, torch and public
transformers API (torchvision lazily and optionally).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Options a single call may override (the processor routes these keyword arguments here).
PREPROCESS_OPTIONS = (
    "image_aspect_ratio",
    "size",
    "crop_size",
    "resample",
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_rescale",
    "do_normalize",
    "do_convert_rgb",
    "alpha_background",
    "backend",
    "max_image_pixels",
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageLoadError",
    "ImageTooLargeError",
    "InternVLChatImageProcessor",
    "check_image_pixels",
    "describe_image",
    "expand_to_square",
    "image_size",
    "PREPROCESS_FLOOR_PIXELS",
    "preprocess_budget",
    "preprocess_pixels",
    "to_rgb",
]

# The one definition of the normalisation statistics (presets and converters import these).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decompression-bomb guard: PIL's own warning threshold (~89.5 MP, e.g. 9459 x 9459). PIL itself refuses images
# above twice this while opening. The same number bounds the largest buffer preprocessing allocates.
# Set `max_image_pixels=None` to disable our checks (PIL's 2x limit still applies to files).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
_MODES = ("pad", "square", "resize")
_BACKENDS = ("pil", "torchvision")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Portrait "pad" without the full canvas: canvas rows are resized horizontally in strips of about this many pixels.
_STRIP_PIXELS = 1 << 22
# Preprocessing may always use buffers of this many pixels (4096², ~50 MB in RGB), whatever `max_image_pixels` says.
PREPROCESS_FLOOR_PIXELS = 4096 * 4096


class ImageLoadError(ValueError):
    """An image could not be loaded or converted (corrupt data, zero size, unsupported mode...).

    The message always names the source (file path, or ``image #i`` for in-memory inputs)."""


class ImageTooLargeError(ImageLoadError):
    """The image, or a buffer its preprocessing would allocate, has more pixels than ``max_image_pixels``."""


# ----------------------------------------------------------------------------------------------------------------
# Size checks and mode conversion
# ----------------------------------------------------------------------------------------------------------------


def describe_image(source: Any) -> str:
    """Short human-readable description of an image source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if text.startswith("data:") or len(text) > 200:
            return f"{text[:40]!r}... ({len(text)} chars)"
        return repr(text)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size}>"
    if isinstance(source, np.ndarray):
        return f"<numpy array shape={source.shape} dtype={source.dtype}>"
    if isinstance(source, torch.Tensor):
        return f"<torch tensor shape={tuple(source.shape)} dtype={source.dtype}>"
    return f"<{type(source).__name__}>"


def check_image_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    """Refuses a zero-size image (`ImageLoadError`) or one of more than `max_pixels` pixels (`ImageTooLargeError`)."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"Image {name} has zero size ({width}x{height}).")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"Image {name} is too large: {width}x{height} = {width * height} pixels > max_image_pixels={max_pixels}."
        )


def _alpha_background(value: Any) -> list[int] | None:
    """Validates an ``alpha_background`` option: None, or three ints in [0, 255] (a list, as JSON stores it)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"alpha_background must be None or an [r, g, b] list of 3 ints in 0..255, got {value!r}.")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= 255:
            raise ValueError(f"alpha_background must be None or an [r, g, b] list of 3 ints in 0..255, got {value!r}.")
        out.append(int(v))
    return out


def _scale_to_uint8(arr: np.ndarray, kind: str, name: str) -> np.ndarray:
    """Scale a high-bit-depth or float array to uint8 without clipping (see `to_rgb` for the rules)."""
    if kind == "16bit":
        # [IMPORTANT] 16-bit -> 8-bit is round(v / 257): maps 0 -> 0, 65535 -> 255 exactly and rounds to the nearest
        # level (32768 -> 128); `v >> 8` would truncate (biased ~0.5 level down). PIL's own convert("L") CLIPS
        # (300 -> 255), which turns most 16-bit photos white: never use it for these modes.
        out = np.rint(arr.astype(np.float64) / 257.0)
    elif kind == "float":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            out = np.rint(arr * 255.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = np.rint(arr)
        else:  # arbitrary range (depth maps...): min-max stretch
            out = np.rint((arr - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(arr)
    elif kind == "int":
        arr = arr.astype(np.int64)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 255:
            out = arr
        elif lo >= 0 and hi <= 65535:
            out = np.rint(arr / 257.0)
        else:  # 32-bit data outside the 16-bit range: min-max stretch
            out = np.rint((arr - lo) * (255.0 / (hi - lo)))
    else:  # pragma: no cover - internal misuse
        raise ImageLoadError(f"Image {name}: internal error, unknown scaling kind {kind!r}.")
    return np.clip(out, 0, 255).astype(np.uint8)


def _has_transparency(image: Image.Image) -> bool:
    bands = image.getbands()
    return "A" in bands or "a" in bands or image.info.get("transparency") is not None


def to_rgb(
    image: Image.Image, name: str = "<PIL image>", alpha_background: Sequence[int] | None = None
) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (the image itself when it already is RGB without transparency).

    * Transparency (RGBA, LA, PA, RGBa, La, and P/L/RGB with a ``transparency`` entry): with
      ``alpha_background=None`` (default) PIL's ``convert("RGB")``, as LLaVA and every model trained with its code:
      alpha is dropped and a fully transparent pixel keeps the colour stored under it. With
      ``alpha_background=(r, g, b)`` the image is alpha-composited onto that colour (a fully transparent pixel
      becomes it), for models trained on composited images.
    * ``I;16*`` (16-bit) is scaled with round(v / 257); ``I`` (32-bit int) the same when its values fit in
      [0, 65535] (as 8-bit when in [0, 255]), else min-max stretched; ``F`` (float) is taken as [0, 1] when it fits
      there (x 255), as [0, 255] when it fits there, else min-max stretched. Never clipped.
    * Everything else (1, L, P, CMYK, YCbCr, LAB, HSV...) uses PIL's ``convert("RGB")``.

    Raises `ImageLoadError` naming `name` for modes PIL cannot convert.
    """
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            arr = np.asarray(image)
            kind = "16bit" if mode in _SIXTEEN_BIT_MODES else ("float" if mode == "F" else "int")
            return Image.fromarray(_scale_to_uint8(arr, kind, name)).convert("RGB")  # 2-D uint8 -> "L"
        if alpha_background is not None and _has_transparency(image):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*(int(v) for v in alpha_background), 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode == "RGB" and image.info.get("transparency") is None:
            return image
        return image.convert("RGB")
    except ImageLoadError:
        raise
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise ImageLoadError(f"Image {name} has an unsupported mode {mode!r}: {err}") from err


def _array_to_pil(arr: np.ndarray, name: str, channels_first: bool) -> Image.Image:
    """HW / HWC (or CHW if `channels_first`) array -> PIL image in L/LA/RGB/RGBA (8-bit)."""
    if arr.ndim == 3 and channels_first:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        raise ImageLoadError(
            f"Image {name} has an unsupported array shape {arr.shape}: expected HW or HWC with 1-4 channels"
            + (" (CHW for torch tensors)." if channels_first else ".")
        )
    check_image_pixels(arr.shape[1], arr.shape[0], None, name)
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 or arr.dtype == np.dtype(">u2"):
        arr = _scale_to_uint8(arr, "16bit", name)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 255.0:
            raise ImageLoadError(
                f"Image {name}: float pixel values must lie in [0, 1] (or [0, 255]); got [{lo:.4g}, {hi:.4g}]."
            )
        arr = _scale_to_uint8(arr, "float", name)
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageLoadError(f"Image {name}: integer pixel values must lie in [0, 65535]; got [{lo}, {hi}].")
        arr = _scale_to_uint8(arr, "int", name)
    else:
        raise ImageLoadError(f"Image {name} has an unsupported dtype {arr.dtype}.")
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 HW / HWx2 / HWx3 / HWx4 -> L / LA / RGB / RGBA


def image_size(source: Any) -> tuple[int, int] | None:
    """(width, height) of a PIL image / HWC array / CHW tensor without converting it; None when unknown."""
    if isinstance(source, Image.Image):
        return source.width, source.height
    if isinstance(source, torch.Tensor) and source.ndim >= 2:
        if source.ndim == 3 and source.shape[0] not in (1, 2, 3, 4) and source.shape[-1] in (1, 2, 3, 4):
            return int(source.shape[1]), int(source.shape[0])  # HWC tensor
        return int(source.shape[-1]), int(source.shape[-2])
    if isinstance(source, np.ndarray) and source.ndim >= 2:
        if source.ndim == 3 and source.shape[-1] not in (1, 2, 3, 4) and source.shape[0] in (1, 2, 3, 4):
            return int(source.shape[2]), int(source.shape[1])  # CHW array
        return int(source.shape[1]), int(source.shape[0])
    return None


def _to_pil(source: Any, name: str) -> Image.Image:
    """PIL image (decoded now, to surface truncation errors here) / array / tensor -> PIL image in its own mode."""
    if isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageLoadError(f"Image {name} is unreadable or corrupt: {type(err).__name__}: {err}") from err
        return source
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        if tensor.ndim == 3 and tensor.shape[0] not in (1, 2, 3, 4) and tensor.shape[-1] in (1, 2, 3, 4):
            tensor = tensor.permute(2, 0, 1)  # tolerate HWC tensors when unambiguous
        return _array_to_pil(tensor.numpy(), name, channels_first=True)
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # tolerate CHW arrays when unambiguous
        return _array_to_pil(arr, name, channels_first=False)
    raise TypeError(
        f"Image {name}: unsupported image type {type(source).__name__} (expected a PIL image, a numpy array, a torch "
        "tensor, or a path / URL string)."
    )


def _is_single_image(obj: Any) -> bool:
    return isinstance(obj, (Image.Image, np.ndarray, torch.Tensor, str, bytes, bytearray, memoryview, os.PathLike))


def _flatten(images: Any) -> list[Any]:
    """One image, a list, or a nested list (batch of lists) -> flat list, in order."""
    if _is_single_image(images):
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)  # a stacked batch (N, ...)
        return [images]
    if isinstance(images, Sequence):
        flat: list[Any] = []
        for item in images:
            flat.extend(_flatten(item))
        return flat
    raise TypeError(f"Unsupported images input of type {type(images).__name__}.")


# ----------------------------------------------------------------------------------------------------------------
# Canvas and preprocessing cost
# ----------------------------------------------------------------------------------------------------------------


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: paste `image` centred on a square canvas of side max(w, h) filled with
    `background`, at offset ``(0, (w - h) // 2)`` for landscape and ``((h - w) // 2, 0)`` for portrait.
    Square images are returned unchanged (same object)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(background))
    canvas.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


def _target_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """(new_width, new_height) of the resize step for an input of `width` x `height` (the canvas for "pad")."""
    if mode == "resize":
        return size, size
    # [IMPORTANT] transformers' shortest-edge rule: the long side is int(size * long / short) (truncated,
    # not rounded); e.g. 500x333 -> 504x336.
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_pixels(width: int, height: int, mode: str, size: int, backend: str = "pil") -> int:
    """Pixels of the largest buffer that preprocessing a `width` x `height` image allocates besides the image
    itself: what an extreme aspect ratio blows up.

    * "pad": torchvision backend, the ``max(w, h)²`` canvas; PIL backend, the ``size x max(w, h)`` intermediate of
      the two resize passes (a canvas is built only up to ``_STRIP_PIXELS`` pixels; a portrait strip holds at
      most that many pixels, or one canvas row).
    * "square": the resize output ``new_w x new_h`` (``size`` x ``size * long / short``) and PIL's horizontal-pass
      intermediate ``new_w x h``.
    * "resize": ``size x size`` and the intermediate ``size x h``.
    """
    side = max(width, height)
    if mode == "pad":
        if backend == "torchvision":
            return side * side
        canvas_part = min(side * side, max(_STRIP_PIXELS, side))  # a small canvas, or one portrait strip
        return max(size * side, size * size, canvas_part)
    new_w, new_h = _target_size(width, height, size, mode)
    return max(new_w * new_h, new_w * height)


def preprocess_budget(max_image_pixels: int | None) -> int | None:
    """Largest buffer (pixels) preprocessing may allocate: ``max_image_pixels``, but never less than
    ``PREPROCESS_FLOOR_PIXELS`` so that a small decode limit does not refuse ordinary images (a 300x200 image
    padded to 336 needs a 336x300 intermediate)."""
    return None if max_image_pixels is None else max(max_image_pixels, PREPROCESS_FLOOR_PIXELS)


def _pad_resize_pil(image: Image.Image, size: int, resample: int, background: tuple[int, ...]) -> Image.Image:
    """``expand_to_square(image, background).resize((size, size), resample)``, byte for byte, without the
    ``max(w, h)²`` canvas.

    PIL resizes in two passes, horizontal then vertical, rounding to uint8 in between; each output pixel of a pass
    depends only on its own row (horizontal) or column (vertical) of the pass's input, with weights that depend only
    on the input and output lengths. So the canvas's horizontal pass is run on the canvas rows that hold image
    pixels (rows of pure background stay the background colour: the 8-bit weights sum to 1), and the vertical pass
    on the resulting ``size x side`` intermediate -- the same two passes with the same lengths. Canvases of up to
    ``_STRIP_PIXELS`` pixels (ordinary photos) are simply built. Checked against the
    canvas for all six PIL filters and many shapes (tests/test_image_processing.py).
    """
    width, height = image.size
    side = max(width, height)
    if width == height or side == size or side * side <= _STRIP_PIXELS:  # no canvas, or a small one: build it
        image = expand_to_square(image, background)
        return image if image.size == (size, size) else image.resize((size, size), resample=resample)
    band = Image.new(image.mode, (size, side), tuple(background))  # the horizontal pass of the whole canvas
    if width > height:  # landscape: canvas rows [top, top + h) are the image rows, the others background
        band.paste(image.resize((size, height), resample=resample), (0, (width - height) // 2))
    else:  # portrait: every canvas row is background | image row | background; resize strips of rows
        left = (height - width) // 2
        rows = max(1, _STRIP_PIXELS // side)
        for top in range(0, height, rows):
            piece = image.crop((0, top, width, min(top + rows, height)))
            strip = Image.new(image.mode, (side, piece.height), tuple(background))
            strip.paste(piece, (left, 0))
            band.paste(strip.resize((size, piece.height), resample=resample), (0, top))
            del piece, strip
    return band.resize((size, size), resample=resample)  # the vertical pass


def _check_preprocess_size(
    width: int, height: int, name: str, max_pixels: int | None, mode: str, size: int, backend: str
) -> None:
    """`check_image_pixels`, then the largest preprocessing buffer against `preprocess_budget(max_pixels)`."""
    check_image_pixels(width, height, max_pixels, name)
    budget = preprocess_budget(max_pixels)
    need = preprocess_pixels(width, height, mode, size, backend)
    if budget is not None and need > budget:
        raise ImageTooLargeError(
            f"Image {name} is too large to preprocess: {width}x{height} in {mode!r} mode ({backend} backend) needs "
            f"a {need}-pixel buffer > {budget} (max_image_pixels={max_pixels}, at least {PREPROCESS_FLOOR_PIXELS})."
        )


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------


class InternVLChatImagesKwargs(ImagesKwargs, total=False):
    """Extra per-call options (routed by a `ProcessorMixin` to the image processor).

    [IMPORTANT] `backend` is deliberately NOT declared here: ProcessorMixin copies every tokenizer init kwarg whose
    name is a declared image kwarg into the image kwargs, and 5.x tokenizers carry ``backend="tokenizers"``."""

    image_aspect_ratio: str | None
    alpha_background: list[int] | None
    max_image_pixels: int | None


def _shortest_edge(size: Any, what: str) -> int:
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            size = size["shortest_edge"]
        elif set(size) == {"height", "width"} and size["height"] == size["width"]:
            size = size["height"]
        else:
            raise ValueError(f"{what} must be an int, {{'shortest_edge': n}} or a square {{'height','width'}} dict.")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) <= 0:
        raise ValueError(f"{what} must be a positive int, got {size!r}.")
    return int(size)


def _torchvision_functional():
    """`torchvision.transforms.v2.functional`, or None when torchvision is unavailable."""
    try:
        from torchvision.transforms.v2 import functional as tvF
    except Exception:  # ImportError, or a broken install (e.g. torch/torchvision version mismatch)
        return None
    return tvF


class InternVLChatImageProcessor(BaseImageProcessor):
    r"""LLaVA-1.5 / InternVL-Chat image processor (pad / square / resize; PIL or torchvision backend).

    Args:
        image_aspect_ratio (`str`, defaults to `"pad"`): `"pad"` (expand to square with the mean colour, then
            CLIP processing), `"square"` (CLIP processing: shortest-edge resize + centre crop) or `"resize"`
            (stretch to `size` x `size`).
        size (`int` or `{"shortest_edge": int}`, defaults to 336): input size (shortest edge after resize).
            Stored as `{"shortest_edge": n}`.
        crop_size (`int` or `{"height": n, "width": n}`, defaults to `size`): output side; stored as a dict.
        resample (`int`, defaults to 3 = bicubic): PIL resampling filter.
        image_mean, image_std (3 floats, default CLIP statistics): use `IMAGENET_MEAN` / `IMAGENET_STD` for
            InternViT towers. The pad colour is `tuple(int(m * 255) for m in image_mean)`.
        rescale_factor (`float`, defaults to 1/255), do_rescale, do_normalize (`bool`, default True).
        do_convert_rgb (`bool`, defaults to True): convert every mode to RGB (see `to_rgb`); False rejects non-RGB.
        alpha_background (`[r, g, b]` or None, defaults to None): None drops transparency as PIL's
            ``convert("RGB")`` (LLaVA's rule); a colour composites transparent images onto it (see `to_rgb`).
        backend (`str`, defaults to `"pil"`): `"pil"` (matches `CLIPImageProcessorPil`) or `"torchvision"`
            (matches the torchvision `CLIPImageProcessor`; falls back to PIL when torchvision is missing).
        max_image_pixels (`int` or None, defaults to 89_478_485): decompression-bomb guard on the image's pixels,
            and (with a floor of ``PREPROCESS_FLOOR_PIXELS``) on the largest buffer preprocessing allocates (see
            `preprocess_pixels`); None disables both.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = InternVLChatImagesKwargs

    # Class-level defaults. [IMPORTANT] they must be non-None: BaseImageProcessor.to_dict drops None-valued
    # attributes whose class default is None, so e.g. `max_image_pixels=None` would not round-trip otherwise.
    image_aspect_ratio = "pad"
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    resample = _BICUBIC
    image_mean = list(OPENAI_CLIP_MEAN)
    image_std = list(OPENAI_CLIP_STD)
    rescale_factor = 1 / 255
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    alpha_background = None  # written to the JSON anyway (see `to_dict`)
    backend = "pil"
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(
        self,
        image_aspect_ratio: str = "pad",
        size: int | dict[str, int] = 336,
        crop_size: int | dict[str, int] | None = None,
        resample: int = _BICUBIC,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
        alpha_background: Sequence[int] | None = None,
        backend: str = "pil",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        # Keys of other image processors (do_resize, do_center_crop, default_to_square, ...) found in converted
        # configs are meaningless here; drop them instead of storing them as attributes.
        for key in ("do_resize", "do_center_crop", "default_to_square", "use_square_size", "do_pad"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        options = self._resolve_options(
            image_aspect_ratio=image_aspect_ratio,
            size=size,
            crop_size=crop_size,
            resample=resample,
            image_mean=OPENAI_CLIP_MEAN if image_mean is None else image_mean,
            image_std=OPENAI_CLIP_STD if image_std is None else image_std,
            rescale_factor=rescale_factor,
            do_rescale=do_rescale,
            do_normalize=do_normalize,
            do_convert_rgb=do_convert_rgb,
            alpha_background=alpha_background,
            backend=backend,
            max_image_pixels=max_image_pixels,
        )
        self.image_aspect_ratio = options["image_aspect_ratio"]
        self.size = {"shortest_edge": options["size"]}
        self.crop_size = {"height": options["crop_size"], "width": options["crop_size"]}
        self.resample = options["resample"]
        self.image_mean = list(options["image_mean"])
        self.image_std = list(options["image_std"])
        self.rescale_factor = options["rescale_factor"]
        self.do_rescale = options["do_rescale"]
        self.do_normalize = options["do_normalize"]
        self.do_convert_rgb = options["do_convert_rgb"]
        self.alpha_background = options["alpha_background"]
        self.backend = options["backend"]
        self.max_image_pixels = options["max_image_pixels"]

    # ------------------------------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """Side of the output square (the crop size)."""
        return int(self.crop_size["height"])

    @property
    def background_color(self) -> tuple[int, ...]:
        """Canvas colour of the "pad" mode: ``tuple(int(m * 255) for m in image_mean)``."""
        return tuple(int(m * 255) for m in self.image_mean)

    @staticmethod
    def _resolve_options(**options) -> dict[str, Any]:
        mode = options["image_aspect_ratio"]
        if mode not in _MODES:
            raise ValueError(f"image_aspect_ratio must be one of {_MODES}, got {mode!r}.")
        backend = options["backend"]
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
        options["size"] = _shortest_edge(options["size"], "size")
        crop = options["crop_size"]
        options["crop_size"] = options["size"] if crop is None else _shortest_edge(crop, "crop_size")
        for key in ("image_mean", "image_std"):
            value = options[key]
            value = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
            if len(value) != 3:
                raise ValueError(f"{key} must have 3 values, got {value!r}.")
            options[key] = value
        if any(s == 0 for s in options["image_std"]):
            raise ValueError(f"image_std must be non-zero, got {options['image_std']!r}.")
        max_pixels = options["max_image_pixels"]
        if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) <= 0):
            raise ValueError(f"max_image_pixels must be a positive int or None, got {max_pixels!r}.")
        options["max_image_pixels"] = None if max_pixels is None else int(max_pixels)
        options["alpha_background"] = _alpha_background(options["alpha_background"])
        options["resample"] = int(options["resample"])
        options["rescale_factor"] = float(options["rescale_factor"])
        for key in ("do_rescale", "do_normalize", "do_convert_rgb"):
            options[key] = bool(options[key])
        return options

    def to_dict(self) -> dict[str, Any]:
        """As `BaseImageProcessor.to_dict`, but ``alpha_background`` is always written (``null`` by default), so
        a saved ``preprocessor_config.json`` shows how transparency is handled."""
        output = super().to_dict()
        output["alpha_background"] = self.alpha_background
        return output

    def check_image_size(
        self, width: int, height: int, name: str = "<image>", max_image_pixels: Any = "default", **overrides
    ) -> None:
        """Refuses an image of `width` x `height` (known from its header, before decoding) that this processor
        would refuse: more than ``max_image_pixels`` pixels, or a preprocessing buffer above
        ``preprocess_budget(max_image_pixels)`` (`ImageTooLargeError`); zero size (`ImageLoadError`).

        `max_image_pixels` defaults to the processor's own; `overrides` are per-call options (image_aspect_ratio,
        size, backend) as `preprocess` takes them."""
        limit = self.max_image_pixels if max_image_pixels == "default" else max_image_pixels
        mode = overrides.get("image_aspect_ratio") or self.image_aspect_ratio
        size = _shortest_edge(overrides.get("size") or self.size, "size")
        backend = overrides.get("backend") or self.backend
        if backend == "torchvision" and _torchvision_functional() is None:
            backend = "pil"
        _check_preprocess_size(width, height, name, limit, mode, size, backend)

    def __call__(self, images: Any, *args, **kwargs) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, *args, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Preprocess one image, a list, or a nested list (flattened in order).

        Images: PIL images (any mode), numpy arrays, torch tensors; strings go through `fetch_images`
        (transformers' ``load_image``). Each is size-checked (`check_image_size`) before it is converted to RGB
        and preprocessed (a lazily opened PIL image also before it is decoded).

        Keyword overrides (for this call only): image_aspect_ratio, size, crop_size, resample, image_mean,
        image_std, rescale_factor, do_rescale, do_normalize, do_convert_rgb, alpha_background, backend,
        max_image_pixels, device (torchvision backend only: where to resize/normalize). Other standard image kwargs
        are ignored.

        Returns:
            `BatchFeature` with ``pixel_values``: float32 ``(N, 3, crop, crop)`` torch tensor for
            ``return_tensors="pt"`` (default), numpy array for ``"np"``, list of numpy arrays for None.
        """
        device = kwargs.pop("device", None)
        names = PREPROCESS_OPTIONS
        options = {}
        for key in names:
            value = kwargs.pop(key, None)
            options[key] = getattr(self, key) if value is None else value
        # crop_size follows an overridden size unless it is overridden too
        if options["crop_size"] is self.crop_size and options["size"] is not self.size:
            options["crop_size"] = None
        options = self._resolve_options(**options)
        unused = {k: v for k, v in kwargs.items() if v is not None}
        if unused:
            logger.warning_once(f"InternVLChatImageProcessor ignores these image kwargs: {sorted(unused)}.")

        backend = options["backend"]
        tvF = None
        if backend == "torchvision":
            tvF = _torchvision_functional()
            if tvF is None:
                logger.warning_once("torchvision is not available: InternVLChatImageProcessor uses the PIL backend.")
                backend = "pil"

        if return_tensors not in ("pt", "torch", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        sources = _flatten(images)
        if not sources:
            raise ValueError("InternVLChatImageProcessor got no images.")
        # One image at a time (converted, processed, released): peak memory is one image's, not the batch's.
        processed = []
        for index, source in enumerate(sources):
            image = self._to_rgb_image(source, f"image #{index}", options, backend)
            if backend == "pil":
                processed.append(self._process_pil(image, options))
            else:
                processed.append(self._process_torchvision(image, options, tvF, device))
            del image

        if backend == "pil":
            if return_tensors in ("pt", "torch"):
                pixel_values: Any = torch.from_numpy(np.stack(processed))
            else:
                pixel_values = np.stack(processed) if return_tensors == "np" else processed
        elif return_tensors in ("pt", "torch"):
            pixel_values = torch.stack(processed)
        elif return_tensors == "np":
            pixel_values = torch.stack(processed).cpu().numpy()
        else:
            pixel_values = [t.cpu().numpy() for t in processed]
        return BatchFeature(data={"pixel_values": pixel_values})

    # ------------------------------------------------------------------------------------------------------------

    def _to_rgb_image(self, source: Any, name: str, options: dict[str, Any], backend: str) -> Image.Image:
        """One input -> 8-bit RGB PIL image, after the size checks (from the header for lazily opened files)."""
        if isinstance(source, (str, os.PathLike)):
            name = f"{name} ({describe_image(source)})"
            try:
                source = self.fetch_images(os.fspath(source))
            except (ValueError, OSError, TypeError) as err:
                raise ImageLoadError(f"Image {name} could not be opened: {err}") from err
        size = image_size(source)
        if size is None:
            _to_pil(source, name)  # raises the TypeError naming the type
        _check_preprocess_size(
            *size, name, options["max_image_pixels"], options["image_aspect_ratio"], options["size"], backend
        )
        image = _to_pil(source, name)
        if options["do_convert_rgb"]:
            return to_rgb(image, name, options["alpha_background"])
        if image.mode != "RGB":
            raise ImageLoadError(f"Image {name} has mode {image.mode!r} but do_convert_rgb=False requires RGB input.")
        return image

    def _prepare(self, image: Image.Image, options: dict[str, Any]) -> Image.Image:
        if options["image_aspect_ratio"] == "pad":
            background = tuple(int(m * 255) for m in options["image_mean"])
            image = expand_to_square(image, background)
        return image

    def _process_pil(self, image: Image.Image, options: dict[str, Any]) -> np.ndarray:
        """PIL resize + numpy crop/rescale/normalize: identical arithmetic to CLIPImageProcessorPil."""
        if options["image_aspect_ratio"] == "pad":
            background = tuple(int(m * 255) for m in options["image_mean"])
            image = _pad_resize_pil(image, options["size"], options["resample"], background)
        else:
            new_w, new_h = _target_size(image.width, image.height, options["size"], options["image_aspect_ratio"])
            if (new_w, new_h) != image.size:
                image = image.resize((new_w, new_h), resample=options["resample"])
        arr = np.asarray(image).transpose(2, 0, 1)  # CHW uint8
        arr = self._center_crop_np(arr, options["crop_size"])
        if options["do_rescale"]:
            # float64 multiply, then float32 -- as transformers.image_transforms.rescale
            arr = (arr.astype(np.float64) * options["rescale_factor"]).astype(np.float32)
        else:
            arr = arr.astype(np.float32)
        if options["do_normalize"]:
            mean = np.asarray(options["image_mean"], dtype=np.float32)[:, None, None]
            std = np.asarray(options["image_std"], dtype=np.float32)[:, None, None]
            arr = (arr - mean) / std
        return np.ascontiguousarray(arr, dtype=np.float32)

    @staticmethod
    def _center_crop_np(arr: np.ndarray, crop: int) -> np.ndarray:
        _, height, width = arr.shape
        top, left = (height - crop) // 2, (width - crop) // 2
        if top >= 0 and left >= 0:
            return arr[:, top : top + crop, left : left + crop]
        # Image smaller than the crop (only when crop_size > size): zero-pad like transformers' center_crop.
        new_h, new_w = max(crop, height), max(crop, width)
        padded = np.zeros((arr.shape[0], new_h, new_w), dtype=arr.dtype)
        pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)  # ceil
        padded[:, pad_top : pad_top + height, pad_left : pad_left + width] = arr
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
        return padded[:, top : top + crop, left : left + crop]

    def _process_torchvision(self, image: Image.Image, options: dict[str, Any], tvF, device) -> torch.Tensor:
        """torchvision v2 resize/crop + fused rescale-normalize: identical arithmetic to CLIPImageProcessor."""
        image = self._prepare(image, options)  # the canvas is pasted in PIL: exact, same for both backends
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # CHW uint8
        if device is not None:
            tensor = tensor.to(device)
        new_w, new_h = _target_size(image.width, image.height, options["size"], options["image_aspect_ratio"])
        interpolation = {
            0: tvF.InterpolationMode.NEAREST_EXACT,
            1: tvF.InterpolationMode.LANCZOS,
            2: tvF.InterpolationMode.BILINEAR,
            3: tvF.InterpolationMode.BICUBIC,
            4: tvF.InterpolationMode.BOX,
            5: tvF.InterpolationMode.HAMMING,
        }[options["resample"]]
        # [IMPORTANT] transformers' torchvision backend always resizes (even to the same size) with antialias=True.
        tensor = tvF.resize(tensor, [new_h, new_w], interpolation=interpolation, antialias=True)
        crop = options["crop_size"]
        height, width = tensor.shape[-2:]
        if crop > height or crop > width:
            pad = [
                max(crop - width, 0) // 2,
                max(crop - height, 0) // 2,
                (max(crop - width, 0) + 1) // 2,
                (max(crop - height, 0) + 1) // 2,
            ]
            tensor = tvF.pad(tensor, pad, fill=0)
            height, width = tensor.shape[-2:]
        top, left = int((height - crop) / 2.0), int((width - crop) / 2.0)
        tensor = tensor[:, top : top + crop, left : left + crop]
        if options["do_normalize"]:
            mean = torch.tensor(options["image_mean"], device=tensor.device)
            std = torch.tensor(options["image_std"], device=tensor.device)
            if options["do_rescale"]:  # fused, as transformers: (x - mean / s) / (std / s)
                mean, std = mean * (1.0 / options["rescale_factor"]), std * (1.0 / options["rescale_factor"])
            tensor = tvF.normalize(tensor.to(torch.float32), mean.tolist(), std.tolist())
        elif options["do_rescale"]:
            tensor = tensor.to(torch.float32) * options["rescale_factor"]
        else:
            tensor = tensor.to(torch.float32)
        return tensor.contiguous()
