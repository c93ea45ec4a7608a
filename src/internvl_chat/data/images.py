"""Image loading: the one function every verb (train, eval, serve, chat, web, caption, select) opens images with.

    from internvl_chat.data.images import ImageLoadError, ImageTooLargeError, load_image

    image = load_image("cat.png")                     # path, PathLike, bytes, data: URL, base64, http(s) URL, PIL...
    image = load_image(data, max_pixels=4096 * 4096, name="messages[0].content[1]",
                       image_processor=processor.image_processor)   # + refuse what preprocessing would refuse
    pixel_values = processor.image_processor(image)["pixel_values"]

What it owns: sources (local file paths, raw bytes, ``{"bytes": ..., "path": ...}`` cells of
HF datasets, ``data:`` URLs, bare base64, http(s) URLs), safe decoding (the pixel count is checked from the header
before the pixel data is decoded; truncated or corrupt data, zero sizes and PIL's own bomb limit become
`ImageLoadError` / `ImageTooLargeError` naming the source), and nothing else.

[IMPORTANT] Decode only: the image keeps its mode (RGBA, LA, P with transparency, I;16, CMYK...). Turning it into
RGB -- LLaVA's ``convert("RGB")`` alpha rule by default, compositing onto ``alpha_background`` for models trained that
way, the high-bit-depth scaling -- is done by the image processor (the Hub unit), so training, eval, serving,
``pipeline(...)`` and a processor loaded from a checkpoint all apply the one rule of the checkpoint's
``preprocessor_config.json``. Converting here as well would apply a second, possibly different, rule.

With ``image_processor`` given, the image is also refused from its header size when the processor would refuse it
(`InternVLChatImageProcessor.check_image_size`: an extreme aspect ratio whose padded canvas or resize buffers exceed
the pixel budget), so a server answers ``image_too_large`` before decoding anything.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..modeling.image_processing_internvl_chat import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageTooLargeError,
    check_image_pixels,
    describe_image,
    image_size,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "ImageTooLargeError",
    "check_image_pixels",
    "describe_image",
    "load_image",
]

_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.+-]+)*?)(?P<b64>;base64)?,", re.IGNORECASE)
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
# http(s) downloads larger than this are refused (the server has its own, configurable, download path).
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


def _check(width: int, height: int, name: str, max_pixels: int | None, image_processor: Any) -> None:
    check_image_pixels(width, height, max_pixels, name)
    if image_processor is not None and hasattr(image_processor, "check_image_size"):
        image_processor.check_image_size(width, height, name=name, max_image_pixels=max_pixels)


def _open_encoded(fp: Any, name: str, max_pixels: int | None, image_processor: Any) -> Image.Image:
    """Encoded image data (path or file object) -> decoded PIL image in its own mode, size checked first."""
    try:
        with Image.open(fp) as img:
            # [IMPORTANT] Image.open only parses the header: check the size BEFORE .load() decodes the pixels.
            _check(img.width, img.height, name, max_pixels, image_processor)
            _strict_load(img)
            return img  # decoded: usable after the file is closed (frame 0 of animations)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"Image {name} is too large (PIL decompression-bomb limit): {err}") from err
    except PermissionError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        # [IMPORTANT] Truncated files raise OSError in .load(), also when another library set
        # ImageFile.LOAD_TRUNCATED_IMAGES globally (`_strict_load`).
        raise ImageLoadError(f"Image {name} is unreadable or corrupt: {type(err).__name__}: {err}") from err


# Serialises the rare loads that must switch PIL's global truncation flag off (see `_strict_load`).
_STRICT_LOCK = threading.Lock()


def _strict_load(img: Image.Image) -> None:
    """``img.load()`` that refuses truncated data even when ``ImageFile.LOAD_TRUNCATED_IMAGES`` was set globally by
    another library in this process (lmms-eval's task module does, at import): a truncated upload must not decode
    into an image with a grey tail. The flag is process-wide, so it is switched off around our load only, under a
    lock; without the flag (the normal case) loads run in parallel, unlocked."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    with _STRICT_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode_base64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageLoadError(f"Image {name}: invalid base64 data: {err}") from err


def _download(url: str, name: str, timeout: float | None) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except OSError as err:
        raise OSError(f"Could not download image {name}: {err}") from err
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageTooLargeError(f"Image {name} is larger than {MAX_DOWNLOAD_BYTES} bytes.")
    return data


def load_image(
    source: Any,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    name: str | None = None,
    timeout: float | None = 10.0,
    image_processor: Any = None,
) -> Any:
    """Load one image and return it decoded, in its own mode (see the module docstring: no RGB conversion here).

    Args:
        source: file path (str or PathLike); bytes / bytearray / memoryview; ``{"bytes": ..., "path": ...}`` (an
            undecoded HF datasets cell); ``data:`` URL; bare base64 string; http(s) URL; PIL image (decoded now,
            returned as is). numpy arrays and torch tensors are returned as they are, after the size check (the
            image processor converts them).
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding);
            None disables the check.
        name: how to name the source in error messages (default: the path, or a short description).
        timeout: seconds for http(s) downloads.
        image_processor: when given (an `InternVLChatImageProcessor`), also refuse, from the header size, what its
            preprocessing would refuse (`check_image_size`, with `max_pixels` as the limit).

    Raises:
        ImageLoadError (ValueError): corrupt/undecodable data, zero size, bad base64.
        ImageTooLargeError (ImageLoadError): more than `max_pixels` pixels, or a preprocessing buffer over budget.
        FileNotFoundError / IsADirectoryError / PermissionError (OSError): a path that cannot be read.
        OSError: a failed download.
        TypeError: an object that is not an image source.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}.")
    if isinstance(source, dict):
        if source.get("bytes"):
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise ImageLoadError(f"Image {name or '<dict>'} has neither 'bytes' nor 'path'.")
    name = name or describe_image(source)

    if isinstance(source, Image.Image):
        _check(source.width, source.height, name, max_pixels, image_processor)
        try:
            source.load()  # lazily opened images: decode now to surface truncation errors here
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageLoadError(f"Image {name} is unreadable or corrupt: {type(err).__name__}: {err}") from err
        return source

    if isinstance(source, (np.ndarray, torch.Tensor)):
        size = image_size(source)  # None for a malformed shape: the image processor names the problem
        if size is not None:
            _check(*size, name, max_pixels, image_processor)
        return source

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"Image {name} is empty (0 bytes).")
        return _open_encoded(io.BytesIO(bytes(source)), name, max_pixels, image_processor)

    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        is_str = isinstance(source, str)
        match = _DATA_URL_RE.match(text) if is_str else None
        if match is not None:
            payload = text[match.end() :]
            if match.group("b64"):
                data = _decode_base64(payload, name)
            else:
                from urllib.parse import unquote_to_bytes

                data = unquote_to_bytes(payload)
            if not data:
                raise ImageLoadError(f"Image {name} is empty (data URL without payload).")
            return _open_encoded(io.BytesIO(data), name, max_pixels, image_processor)
        if is_str and text.startswith(("http://", "https://")):
            return _open_encoded(io.BytesIO(_download(text, name, timeout)), name, max_pixels, image_processor)
        if os.path.isfile(text):
            return _open_encoded(text, name, max_pixels, image_processor)
        if is_str and len(text) >= 64 and _BASE64_RE.match(text):
            return _open_encoded(io.BytesIO(_decode_base64(text, name)), name, max_pixels, image_processor)
        if os.path.isdir(text):
            raise IsADirectoryError(f"Image {name} is a directory, not an image file.")
        raise FileNotFoundError(f"Image {name} not found (no such file, and not a URL or base64 data).")

    raise TypeError(f"Image {name}: unsupported image source type {type(source).__name__}.")
