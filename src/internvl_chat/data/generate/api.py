"""The endpoint side of `data generate`: one OpenAI-compatible chat client (the `openai` SDK: its retries with
backoff on 408 / 409 / 429 / 5xx, timeouts and dropped connections, honouring ``Retry-After``), a requests- and
tokens-per-minute limiter shared by the worker threads, image data URLs, token estimates, and the structured call
with one repair attempt.

    limiter = RateLimiter(requests_per_minute=500, tokens_per_minute=200_000)
    client = ChatClient("https://api.openai.com/v1", "gpt-4o", api_key, limiter=limiter, max_retries=5)
    value, usage = ask_structured(client, messages, parse_caption, max_tokens=1024)

Errors: a reply that does not parse is sent back once with the parser's message (``REPAIR_PROMPT``); a second bad
reply raises :class:`RecordFailed` (``invalid_output``). A call that still fails after the SDK's retries raises
:class:`RecordFailed` (``api_error``; such records are tried again by a rerun). A wrong key, a refused permission or
an unknown model / URL stop the whole run (:class:`EndpointError`): every other call would fail the same way.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from .checks import OutputError

__all__ = [
    "REPAIR_PROMPT",
    "ChatClient",
    "EndpointError",
    "RateLimiter",
    "RecordFailed",
    "Usage",
    "ask_structured",
    "estimate_text_tokens",
    "image_data_url",
    "image_tokens",
]

REPAIR_PROMPT = (
    "Your reply could not be used: {error}. Reply again with only the JSON object in the requested format, "
    "with no other text."
)
# Formats every vision endpoint accepts as data URLs; anything else is re-encoded as PNG.
_SENT_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class EndpointError(ValueError):
    """The endpoint refuses every call (authentication, permission, unknown model or URL): the run stops."""


class RecordFailed(Exception):
    """This record produced nothing; ``reason`` is the summary's key, ``detail`` the message."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class Usage(dict):
    """Token counts of one record's calls: calls, repairs, prompt_tokens, completion_tokens, total_tokens."""

    KEYS = ("calls", "repairs", "prompt_tokens", "completion_tokens", "total_tokens")

    def __init__(self, **values: int):
        super().__init__({k: int(values.get(k, 0)) for k in self.KEYS})

    def add(self, other: dict[str, int]) -> Usage:
        for k in self.KEYS:
            self[k] += int(other.get(k, 0) or 0)
        return self


class RateLimiter:
    """Requests- and tokens-per-minute budgets (token buckets refilled continuously, each holding at most one
    minute's budget), shared by threads. ``acquire(tokens)`` blocks until a request of that many (estimated) tokens
    fits both budgets; ``settle(estimated, actual)`` corrects the token bucket once the real usage is known.
    ``None`` disables a budget. ``clock`` / ``sleep`` are injectable for tests."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._requests = float(requests_per_minute or 0)
        self._tokens = float(tokens_per_minute or 0)
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed, self._last = max(0.0, now - self._last), now
        if self.rpm:
            self._requests = min(self.rpm, self._requests + elapsed * self.rpm / 60.0)
        if self.tpm:
            self._tokens = min(self.tpm, self._tokens + elapsed * self.tpm / 60.0)

    def acquire(self, tokens: int = 0) -> None:
        # A request larger than a whole minute's budget waits for a full bucket (else it would wait forever).
        tokens = min(float(tokens), float(self.tpm)) if self.tpm else 0.0
        while True:
            with self._lock:
                self._refill()
                wait = 0.0
                if self.rpm and self._requests < 1:
                    wait = (1 - self._requests) * 60.0 / self.rpm
                if self.tpm and self._tokens < tokens:
                    wait = max(wait, (tokens - self._tokens) * 60.0 / self.tpm)
                if wait <= 0:
                    if self.rpm:
                        self._requests -= 1
                    if self.tpm:
                        self._tokens -= tokens
                    return
            self.sleep(wait)

    def settle(self, estimated: int, actual: int) -> None:
        if self.tpm:
            with self._lock:
                self._tokens -= actual - min(float(estimated), float(self.tpm))


def image_data_url(image: Any, raw: bytes) -> str:
    """A ``data:`` URL of a decoded image: the file's own bytes when its format is one endpoints accept, else PNG."""
    mime = _SENT_AS_IS.get(getattr(image, "format", None) or "")
    if mime is None:
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            # CMYK, I;16, P...: PNG cannot hold some of them; this is what a viewer shows
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        raw, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def image_tokens(width: int, height: int, detail: str = "high") -> int:
    """Input tokens an image costs on GPT-4o-class endpoints (their published tile rule): ``low`` 85; ``high`` /
    ``auto``: fit in 2048×2048, shortest side down to 768, then 170 per 512-px tile + 85. Other endpoints count
    differently: an estimate."""
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def estimate_text_tokens(text: str) -> int:
    """About four characters per token (English, BPE tokenizers): an estimate for budgets, not a count."""
    return math.ceil(len(text) / 4)


def _estimate_messages(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                total += estimate_text_tokens(part["text"]) + 4
            else:
                total += part.get("_tokens", 765)
    return total


class ChatClient:
    """Chat completions on one endpoint and model, through the `openai` SDK, rate-limited."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        limiter: RateLimiter | None = None,
        max_retries: int = 5,
        timeout: float = 120.0,
        temperature: float | None = None,
        json_mode: bool = False,
        client: Any = None,
    ):
        import openai

        self.model = model
        self.limiter = limiter or RateLimiter()
        self.temperature = temperature
        self.json_mode = json_mode
        self.client = client or openai.OpenAI(
            base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout
        )

    def complete(self, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, dict[str, int]]:
        """The reply text and its usage (``calls`` 1; tokens 0 where the endpoint reports none)."""
        import openai

        estimate = _estimate_messages(messages) + max_tokens
        self.limiter.acquire(estimate)
        kwargs: dict[str, Any] = {"model": self.model, "messages": _wire(messages), "max_tokens": max_tokens}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            response = self.client.chat.completions.create(**kwargs)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise EndpointError(f"the endpoint refused the request ({type(err).__name__}: {_message(err)})") from err
        except openai.APIStatusError as err:
            self.limiter.settle(estimate, 0)
            raise RecordFailed("api_error", f"HTTP {err.status_code}: {_message(err)}") from err
        except openai.APIError as err:  # timeouts and connection errors, after the SDK's retries
            self.limiter.settle(estimate, 0)
            raise RecordFailed("api_error", f"{type(err).__name__}: {_message(err)}") from err
        usage = getattr(response, "usage", None)
        counts = {
            "calls": 1,
            "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        }
        counts["total_tokens"] = int(getattr(usage, "total_tokens", 0) or 0) or (
            counts["prompt_tokens"] + counts["completion_tokens"]
        )
        self.limiter.settle(estimate, counts["total_tokens"] or estimate)
        choices = getattr(response, "choices", None) or []
        text = choices[0].message.content if choices and choices[0].message is not None else None
        if choices and getattr(choices[0], "finish_reason", None) == "length":
            counts["truncated"] = 1
        return text or "", counts


def _message(err: Exception) -> str:
    return " ".join(str(getattr(err, "message", None) or err).split())[:300]


def _wire(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as sent (our ``_tokens`` estimate hints removed from image parts)."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{k: v for k, v in part.items() if not k.startswith("_")} for part in content]
        out.append({**message, "content": content})
    return out


def ask_structured(
    client: ChatClient,
    messages: list[dict[str, Any]],
    parse: Callable[[str], Any],
    max_tokens: int,
    usage: Usage,
) -> Any:
    """``parse(reply)``; on :class:`OutputError` the reply and the error go back once for a repair. Adds every
    call's tokens to ``usage``. Raises :class:`RecordFailed` (``invalid_output``) when the repair fails too."""
    text, counts = client.complete(messages, max_tokens)
    usage.add(counts)
    try:
        return parse(text)
    except OutputError as err:
        first_error = err
        if counts.get("truncated"):  # the model was not wrong, the limit was: say so in the record's reason
            first_error = OutputError(f"{err}; the reply stopped at the {max_tokens}-token limit (--max-tokens)")
    repair = [
        *messages,
        {"role": "assistant", "content": text},
        {"role": "user", "content": REPAIR_PROMPT.format(error=first_error)},
    ]
    text, counts = client.complete(repair, max_tokens)
    usage.add(counts)
    usage["repairs"] += 1
    try:
        return parse(text)
    except OutputError as err:
        raise RecordFailed("invalid_output", f"{err} (after one repair; first reply: {first_error})") from None
