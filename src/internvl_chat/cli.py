"""The `internvl-chat` console script: one command, one verb per job, one-line answers for ordinary mistakes.

    internvl-chat demo                       # build a tiny model, train it on CPU, score it, chat with it
    internvl-chat create --preset NAME --output DIR [--tiny] [--tokenizer DIR]
    internvl-chat VERB --help                # answers before torch / transformers are imported

Each verb is a module with `make_parser()` and `main(argv)`; adding a verb is one row in `VERBS`. Verb modules
import torch / transformers inside their `main`, after the arguments are parsed, so `--help` and argument errors are
instant.

Errors: a known user error (a missing file, a bad value or field, a model folder that does not load, a checkpoint
that does not convert, a YAML syntax error, no network for `push`...) is printed as one line `error: ...` and the
exit status is 2. `--debug` (anywhere on the command line) or `INTERNVL_CHAT_DEBUG=1` shows the traceback instead.
"""

import importlib
import os
import re
import sys

VERBS = {
    "demo": ("internvl_chat.demo", "train a tiny LLaVA on CPU (digits + letters), score it, chat with it"),
    "create": ("internvl_chat.hub.create", "write a random-init model + processor for a seed preset"),
    "convert": ("internvl_chat.hub.convert", "convert an original checkpoint (LLaVA, InternVL, LLaVA-HR...) to ours"),
    "export": ("internvl_chat.hub.export", "export a CLIP-tower model to transformers-native Llava"),
    "push": ("internvl_chat.hub.push", "write a model card and upload a folder to the Hub"),
    "data": (
        "internvl_chat.data.cli",
        "check, convert (LLaVA JSON / datasets / parquet) and generate (captions, QA via an API) data",
    ),
    "train": ("internvl_chat.training.train", "run a training recipe (YAML) with TRL's SFTTrainer"),
    "eval": ("internvl_chat.eval.run", "evaluate on a benchmark"),
    "lmms-eval": ("internvl_chat.eval.lmms_cli", "run lmms-eval with our model registered as --model internvl_chat"),
    "chat": ("internvl_chat.serve.chat", "multi-turn terminal chat"),
    "serve": ("internvl_chat.serve.server", "OpenAI-compatible HTTP server"),
    "web": ("internvl_chat.serve.web", "Gradio web UI"),
    "select": ("internvl_chat.data.select", "score and select instruction data (mIFD / IFD / VFD / FFD)"),
    "caption": ("internvl_chat.data.caption", "batch-caption images into LLaVA JSON"),
}

DEBUG_ENV = "INTERNVL_CHAT_DEBUG"

# Exception types that mean "the input is wrong", not "the program is wrong": (module, class name). A type counts
# only once its module is imported (an exception can only have been raised by imported code), so checking costs no
# import. Anything else keeps its traceback.
USER_ERRORS = (
    ("builtins", "ValueError"),  # factories, recipes, overrides, presets: messages name the field / flag / value
    ("builtins", "FileNotFoundError"),
    ("builtins", "NotADirectoryError"),
    ("builtins", "IsADirectoryError"),
    ("builtins", "PermissionError"),
    ("builtins", "ConnectionError"),  # huggingface_hub's OfflineModeIsEnabled, refused connections
    ("internvl_chat.data.formats", "DataError"),
    ("internvl_chat.loading", "ModelLoadError"),
    ("internvl_chat.hub.checkpoint_io", "CheckpointError"),  # ConversionError is one
    ("internvl_chat.serve.engine", "EngineError"),
    ("internvl_chat.eval.judge", "JudgeError"),
    ("yaml", "YAMLError"),
    ("huggingface_hub.errors", "HfHubHTTPError"),
    ("huggingface_hub.errors", "LocalEntryNotFoundError"),
    ("httpx", "TransportError"),  # no network
)


def user_error_types() -> tuple[type, ...]:
    types = []
    for module, name in USER_ERRORS:
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type):
            types.append(found)
    return tuple(types)


def error_line(exc: BaseException) -> str:
    """One line naming what is wrong (the file for OS errors, the message otherwise)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}"
    else:
        # "[Errno 2] No such file..." wrapped in another error's message: keep the words
        message = re.sub(r"\[Errno \d+\] ", "", str(exc).strip()) or type(exc).__name__
        if isinstance(exc, ConnectionError) or type(exc).__module__.startswith(("httpx", "huggingface_hub")):
            message = f"{type(exc).__name__}: {message}"  # "Connection refused" alone does not say what failed
    return "error: " + "; ".join(line.strip() for line in message.splitlines() if line.strip())


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}} {help_}" for verb, (_, help_) in VERBS.items()]
    return (
        "usage: internvl-chat VERB [options]      (internvl-chat VERB --help for a verb's options)\n\nverbs:\n"
        + "\n".join(lines)
        + f"\n\n--debug (or {DEBUG_ENV}=1) shows the full traceback of an error instead of its one-line message."
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"error: unknown verb {argv[0]!r}\n{usage()}\n")
            return 2
        sys.stdout.write(usage() + "\n")
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(VERBS[verb][0])
        # Parse first: --help and argument errors exit here, before the heavy imports (each verb parses again).
        module.make_parser().parse_known_args(rest)
        from .modeling import register_auto_classes

        register_auto_classes()
        return module.main(rest)
    except SystemExit as exc:
        if debug or exc.code is None or isinstance(exc.code, int):
            raise
        message = str(exc.code)
        sys.stderr.write((message if message.startswith("error:") else f"error: {message}") + "\n")
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, user_error_types()):
            raise
        sys.stderr.write(error_line(exc) + "\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
