"""Prompt files of `internvl-chat data generate`: one folder per step, one system message and one user prompt per
image source, plain text the user can edit.

    prompts/captions/system.txt      prompts/captions/{natural,document,text-rich}.txt
    prompts/enrich/system.txt        prompts/enrich/{natural,document,text-rich}.txt
    prompts/qa/system.txt            prompts/qa/{natural,document,text-rich}.txt

``--prompts DIR`` reads the same layout from DIR (``internvl-chat data generate prompts DIR`` writes the shipped
files there to start from); a file DIR lacks falls back to the shipped one, and a new ``STEP/NAME.txt`` adds the
source NAME. Placeholders ``{caption}``, ``{human_caption}``, ``{ocr}``, ``{num_qa}`` and ``{source}`` are
replaced by the record's values; any other ``{word}`` is refused when the files are read (a typo would otherwise
reach the endpoint). The reply format (a JSON object) is not in these files: the step appends its own format line,
so an edited prompt cannot break the parser.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_PROMPTS_DIR", "PLACEHOLDERS", "SOURCES", "STEPS", "Prompts", "export_prompts", "load_prompts"]

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
STEPS = ("captions", "enrich", "qa")
SOURCES = ("natural", "document", "text-rich")  # shipped: photos, documents / charts / screenshots, scene text
PLACEHOLDERS = ("caption", "human_caption", "ocr", "num_qa", "source")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Prompts:
    """The system message and the per-source user prompts of one step (texts, with the files they came from)."""

    step: str
    system: str
    sources: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # source (or "system") -> path

    def user(self, name: str, /, **values: object) -> str:
        """The user prompt of source ``name`` with its placeholders filled (a missing value renders as ``(none)``)."""
        if name not in self.sources:
            raise ValueError(f"no {self.step} prompt for source {name!r} (known: {', '.join(sorted(self.sources))})")

        def fill(match: re.Match) -> str:
            value = values.get(match.group(1))
            text = "" if value is None else str(value).strip()
            return text or "(none)"

        return _PLACEHOLDER.sub(fill, self.sources[name])


def _read(path: Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"prompt file {path} is empty")
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(
            f"prompt file {path}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} "
            f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
        )
    return text


def load_prompts(step: str, folder: str | os.PathLike | None = None) -> Prompts:
    """The prompts of ``step``: the shipped files, overridden / extended by ``folder/STEP/*.txt`` when given."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r} (known: {', '.join(STEPS)})")
    files = {p.stem: p for p in sorted((DEFAULT_PROMPTS_DIR / step).glob("*.txt"))}
    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--prompts folder not found: {folder}")
        files.update({p.stem: p for p in sorted((Path(folder) / step).glob("*.txt"))})
    if "system" not in files:
        raise ValueError(f"no system prompt for step {step}")
    texts = {name: _read(path) for name, path in files.items()}
    system = texts.pop("system")
    return Prompts(step, system, texts, {name: str(path) for name, path in files.items()})


def export_prompts(dest: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Copies the shipped prompt files to ``dest/STEP/NAME.txt`` (existing files kept unless ``overwrite``)."""
    written = []
    for step in STEPS:
        for src in sorted((DEFAULT_PROMPTS_DIR / step).glob("*.txt")):
            target = Path(dest) / step / src.name
            if target.exists() and not overwrite:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            written.append(str(target))
    return written
