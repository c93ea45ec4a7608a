"""What `data generate` accepts from an endpoint: the reply parsed as one JSON object and validated against the
step's schema (pydantic), and the extractive rule of Hybrid-Instruct QA (an answer must occur in the caption / OCR
text after normalisation).

    caption = parse_caption(text)                  # {"caption": "..."} -> str; OutputError when malformed
    pairs = parse_qa(text)                         # {"qa": [{"question", "answer", "explain_question",
                                                   #          "explain_answer"}, ...]} -> list[QAPair]
    is_extractive("Open 24 hours", ["A red sign reads \\"OPEN 24 HOURS\\"."])   # True

Normalisation (``normalize``): Unicode NFKC, case folded, every character that is not a letter, digit or mark becomes
a space, runs of spaces collapse. An answer is extractive when its normalised words occur as consecutive whole words
of a normalised source text: "open 24 hours" matches 'reads "OPEN 24 HOURS".', "24" does not match inside "2024".
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

__all__ = [
    "CAPTION_FORMAT",
    "QA_FORMAT",
    "OutputError",
    "QAPair",
    "is_extractive",
    "normalize",
    "parse_caption",
    "parse_json_object",
    "parse_qa",
]

# Appended to every prompt of the step (not in the editable files: the parser and the prompt must agree).
CAPTION_FORMAT = 'Reply with one JSON object and nothing else: {"caption": "<the caption>"}'
QA_FORMAT = (
    'Reply with one JSON object and nothing else: {"qa": [{"question": "...", "answer": "...", '
    '"explain_question": "...", "explain_answer": "..."}, ...]} with {num_qa} items, in the order asked.'
)


class OutputError(ValueError):
    """The endpoint's reply is not the JSON object the step asked for (the message is sent back for one repair)."""


IMAGE_PLACEHOLDER = "<image>"


def _no_placeholder(value: str) -> str:
    # [IMPORTANT] a generated "<image>" in a turn would be one more image placeholder than the record has images:
    # training refuses such a sample. The reply is sent back for repair instead.
    if IMAGE_PLACEHOLDER in value:
        raise ValueError(f"contains the reserved {IMAGE_PLACEHOLDER} placeholder")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class _Caption(_Strict):
    caption: str

    @field_validator("caption")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("the caption is empty")
        return _no_placeholder(value)


class QAPair(_Strict):
    """One extractive QA pair and the self-explain pair that follows it."""

    question: str
    answer: str
    explain_question: str
    explain_answer: str

    @field_validator("question", "answer", "explain_question", "explain_answer")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("empty text")
        return _no_placeholder(value)


class _QA(_Strict):
    qa: list[QAPair]

    @field_validator("qa")
    @classmethod
    def _some(cls, value: list[QAPair]) -> list[QAPair]:
        if not value:
            raise ValueError("no QA pairs")
        return value


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json_object(text: str | None) -> dict:
    """The JSON object of a reply: the whole text, a fenced code block, or the span from the first ``{`` to the last
    ``}`` (models often add a sentence around it). Raises :class:`OutputError` saying what is wrong."""
    text = (text or "").strip()
    if not text:
        raise OutputError("the reply is empty")
    fenced = _FENCE.match(text)
    candidates = [fenced.group(1).strip()] if fenced else [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    error = None
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError as err:
            error = err
            continue
        if isinstance(value, dict):
            return value
        error = f"a JSON {type(value).__name__}, not an object"
    raise OutputError(f"the reply is not a JSON object ({error})")


def _validate(model: type[BaseModel], text: str | None) -> BaseModel:
    value = parse_json_object(text)
    try:
        return model.model_validate(value)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'object'}: {e['msg']}" for e in err.errors())
        raise OutputError(f"the JSON object does not have the expected fields ({problems})") from None


def parse_caption(text: str | None) -> str:
    return _validate(_Caption, text).caption


def parse_qa(text: str | None) -> list[QAPair]:
    return list(_validate(_QA, text).qa)


def normalize(text: str) -> str:
    """NFKC, case folded, non-alphanumerics to spaces, whitespace collapsed (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    chars = [c if unicodedata.category(c)[0] in "LNM" else " " for c in text]
    return " ".join("".join(chars).split())


def is_extractive(answer: str, sources: Iterable[str | None]) -> bool:
    """True when the normalised answer occurs, as whole words, in one of the normalised source texts."""
    needle = normalize(answer)
    if not needle:
        return False
    return any(f" {needle} " in f" {normalize(s)} " for s in sources if s)
