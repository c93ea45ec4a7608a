"""The `internvl-chat` console script: one command, one verb per job.

    internvl-chat demo                       # build a tiny model, save, reload with trust_remote_code, chat
    internvl-chat create --preset NAME --output DIR [--tiny] [--tokenizer DIR]

Each verb is a module with `make_parser()` and `main(argv)`; adding a verb is one row in `VERBS`.
"""

import importlib
import sys

VERBS = {
    "demo": ("internvl_chat.demo", "end-to-end demo on a tiny model"),
    "create": ("internvl_chat.hub.create", "write a random-init model + processor for a seed preset"),
    "convert": ("internvl_chat.hub.convert", "convert an original checkpoint (LLaVA, InternVL, LLaVA-HR...) to ours"),
    "export": ("internvl_chat.hub.export", "export a CLIP-tower model to transformers-native Llava"),
    "push": ("internvl_chat.hub.push", "write a model card and upload a folder to the Hub"),
    "data": ("internvl_chat.data.cli", "check a dataset, convert between LLaVA JSON / datasets / parquet"),
    "train": ("internvl_chat.training.train", "run a training recipe (YAML) with TRL's SFTTrainer"),
    "eval": ("internvl_chat.eval.run", "evaluate on a benchmark"),
    "chat": ("internvl_chat.serve.chat", "multi-turn terminal chat"),
    "serve": ("internvl_chat.serve.server", "OpenAI-compatible HTTP server"),
    "web": ("internvl_chat.serve.web", "Gradio web UI"),
    "select": ("internvl_chat.data.select", "score and select instruction data (mIFD / IFD / VFD / FFD)"),
    "caption": ("internvl_chat.data.caption", "batch-caption images into LLaVA JSON"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        lines = [f"  {verb:<8} {help_}" for verb, (_, help_) in VERBS.items()]
        message = "usage: internvl-chat VERB [options]\n\nverbs:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"unknown verb {argv[0]!r}\n{message}\n")
            return 2
        sys.stdout.write(message + "\n")
        return 0
    module = importlib.import_module(VERBS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
