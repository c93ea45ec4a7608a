"""`internvl-chat chat`: multi-turn terminal chat with streaming output.

    internvl-chat chat --model DIR [--image PATH] [--temperature 0.2] [--top-p 1.0] [--max-new-tokens 512]
                       [--image-aspect-ratio pad|square|resize] [--system TEXT] [model options: see loading.py]

Commands at the prompt:
    /image PATH   attach an image to your next message (several may be attached)
    /reset        start a new conversation (drops the history and the images)
    /save FILE    write the conversation as JSON (images as their paths)
    /help, /exit  (Ctrl-D exits too)

The prompt is the model's own chat template, answers stop at its stop strings (e.g. `</s>`); every turn sends the
whole conversation, images included, as LLaVA's CLI does. Reads standard input, so it can be scripted:
`printf '/image cat.jpg\\nWhat is it?\\n' | internvl-chat chat --model DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..loading import ModelLoadError, add_model_args, load_model, model_kwargs

if TYPE_CHECKING:  # the engine (torch) is imported in main(): `--help` answers before torch loads
    from .engine import Engine, SamplingParams

logger = logging.getLogger(__name__)

HELP = "commands: /image PATH, /reset, /save FILE, /help, /exit"


class ChatSession:
    """The conversation state of the terminal chat (kept apart from I/O so it can be tested and reused)."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None, image_aspect_ratio=None):
        self.engine = engine
        self.params = params
        self.system = system
        self.image_aspect_ratio = image_aspect_ratio
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict] = []  # {"role", "text", "images": [paths]}
        self.pending: list[str] = []
        self.images: dict[str, object] = {}

    def attach(self, path: str) -> None:
        """Loads the image now (so a bad path is reported at once) and attaches it to the next message."""
        from ..data.images import load_image

        image = load_image(path)
        self.images[path] = image
        self.pending.append(path)

    def messages(self) -> tuple[list[dict], list]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        images = []
        for turn in self.turns:
            content = [{"type": "image"} for _ in turn["images"]] + [{"type": "text", "text": turn["text"]}]
            messages.append({"role": turn["role"], "content": content})
            images.extend(self.images[p] for p in turn["images"])
        return messages, images

    def ask(self, text: str):
        """Adds the user turn and yields the answer's text deltas; the answer joins the history at the end."""
        self.turns.append({"role": "user", "text": text, "images": self.pending})
        self.pending = []
        messages, images = self.messages()
        answer = []
        try:
            for delta in self.engine.generate(
                messages, images, self.params, image_aspect_ratio=self.image_aspect_ratio
            ):
                answer.append(delta)
                yield delta
        except BaseException:
            self.turns.pop()  # a failed turn is not kept: the user can retry it
            raise
        self.turns.append({"role": "assistant", "text": "".join(answer), "images": []})

    def save(self, path: str) -> None:
        data = {
            "system": self.system,
            "messages": [
                {
                    "role": t["role"],
                    "content": [{"type": "image", "path": p} for p in t["images"]]
                    + [{"type": "text", "text": t["text"]}],
                }
                for t in self.turns
            ],
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat chat", description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--image-aspect-ratio", choices=["pad", "square", "resize"], help="default: the model's")
    parser.add_argument("--system", help="system prompt (default: the template's)")
    return parser


def _read(prompt: str) -> str | None:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from .engine import Engine, EngineError, SamplingParams

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, processor = load_model(**model_kwargs(args))
    except ModelLoadError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    engine = Engine(model, processor, max_batch_size=1, batch_window=0.0, request_timeout=24 * 3600).start()
    session = ChatSession(engine, params, system=args.system, image_aspect_ratio=args.image_aspect_ratio)
    try:
        for path in args.image:
            session.attach(path)
    except (OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(f"internvl-chat: {Path(args.model).name} ({HELP})")
    try:
        while True:
            line = _read("USER: ")
            if line is None:
                print()
                break
            line = line.strip()
            if not line:
                continue
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                print(HELP)
            elif command == "/reset":
                session.reset()
                print("(conversation cleared)")
            elif command == "/image":
                try:
                    session.attach(rest.strip())
                    print(f"(image {rest.strip()} attached to your next message)")
                except (OSError, ValueError) as err:
                    print(f"(could not load the image: {err})")
            elif command == "/save":
                if not rest.strip():
                    print("(usage: /save FILE)")
                    continue
                session.save(rest.strip())
                print(f"(saved to {rest.strip()})")
            elif command.startswith("/") and command[1:].isalpha():
                print(f"(unknown command {command}; {HELP})")
            else:
                sys.stdout.write("ASSISTANT: ")
                try:
                    for delta in session.ask(line):
                        sys.stdout.write(delta)
                        sys.stdout.flush()
                except EngineError as err:
                    sys.stdout.write(f"\n(error: {err})")
                sys.stdout.write("\n")
    except KeyboardInterrupt:
        print()
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
