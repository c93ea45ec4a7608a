"""OCR text for `data generate enrich` / `qa`: from a field of the input record, or from RapidOCR (the optional
extra ``internvl-chat[ocr]``: ``rapidocr-onnxruntime``, whose detection / recognition models ship inside the wheel,
so nothing is downloaded at run time).

    text = ocr_from_field(record.get("ocr"))     # "a b" | ["line", ...] | [{"text": "line", ...}, ...] -> str
    engine = RapidOCREngine()                     # ValueError naming the extra when it is not installed
    text = engine(image)                          # a decoded PIL image -> one line per text region, reading order

Reading order: regions sorted top to bottom by the centre of their box, regions whose centres lie within half a line
height of each other count as one line and are read left to right.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["RapidOCREngine", "ocr_from_field"]


def ocr_from_field(value: Any) -> str | None:
    """The OCR text of a record field: a string, a list of strings, or a list of ``{"text": ...}`` objects (one line
    each). ``None`` when the field is absent; ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict):
                item = item.get("text", item.get("word"))
            if not isinstance(item, str):
                raise ValueError(f"OCR field: expected strings or {{'text': ...}} objects, got {type(item).__name__}")
            if item.strip():
                lines.append(item.strip())
        return "\n".join(lines)
    raise ValueError(f"OCR field: expected a string or a list, got {type(value).__name__}")


class RapidOCREngine:
    """RapidOCR (ONNX Runtime, CPU) on decoded images; one call at a time (the worker threads share one engine)."""

    def __init__(self, min_score: float = 0.5):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:
            raise ValueError(
                "--ocr-engine rapidocr needs the optional OCR extra: pip install 'internvl-chat[ocr]' "
                f"(rapidocr-onnxruntime; {err})"
            ) from err
        self.engine = RapidOCR()
        self.min_score = min_score
        self._lock = threading.Lock()

    def __call__(self, image: Any) -> str:
        import numpy as np
        from PIL import Image

        # OCR wants dark text on a light page: transparent regions become white (not the black of convert("RGB")).
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, rgba)
        array = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()  # RapidOCR reads OpenCV's BGR order
        with self._lock:
            result, _ = self.engine(array)
        regions = []
        for box, text, score in result or []:
            if float(score) < self.min_score or not str(text).strip():
                continue
            ys = [float(p[1]) for p in box]
            xs = [float(p[0]) for p in box]
            regions.append(((min(ys) + max(ys)) / 2, max(ys) - min(ys), min(xs), str(text).strip()))
        regions.sort()
        lines: list[list[tuple[float, str]]] = []
        last_centre, last_height = None, 0.0
        for centre, height, left, text in regions:
            if last_centre is not None and abs(centre - last_centre) <= max(height, last_height) / 2:
                lines[-1].append((left, text))
            else:
                lines.append([(left, text)])
                last_centre, last_height = centre, height
        return "\n".join(" ".join(t for _, t in sorted(line)) for line in lines)
