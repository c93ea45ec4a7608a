"""`internvl-chat lmms-eval`: lmms-eval's own command line, with our `internvl_chat` model adapter registered.

    internvl-chat lmms-eval --model internvl_chat --model_args pretrained=DIR --tasks textvqa_val --batch_size 16
    python -m internvl_chat.eval.lmms_cli --model internvl_chat --model_args pretrained=DIR --tasks textvqa_val
    accelerate launch -m internvl_chat.eval.lmms_cli --model internvl_chat --model_args pretrained=DIR --tasks ...
    internvl-chat lmms-eval --lmms-help        # lmms-eval's own options (--tasks, --limit, --output_path ...)

Every argument goes to lmms-eval unchanged (its flat ``--model ... --tasks ...`` form and its subcommands such as
``tasks list``). The adapter and its ``--model_args`` keys: `internvl_chat.eval.lmms`. Installing the package with
the ``lmms`` extra also registers the adapter as an ``lmms_eval.models`` entry point, so lmms-eval's own
``lmms-eval --model internvl_chat ...`` / ``python -m lmms_eval --model internvl_chat ...`` find it too.

Light module: lmms-eval, torch and transformers are imported in `main`, after the arguments are read.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

MODEL_NAME = "internvl_chat"
CLASS_PATH = "internvl_chat.eval.lmms.InternVLChat"
INSTALL_HINT = "lmms-eval is not installed: pip install 'internvl-chat[lmms]' (or pip install lmms-eval)."


def manifest():
    """lmms-eval's registration record of the adapter (the package's ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Registers `internvl_chat` in lmms-eval's model registry (idempotent; needs no entry point)."""
    import lmms_eval.models as models

    models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH.rsplit(".", 1)[-1]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internvl-chat lmms-eval",
        description=__doc__.split("\n\nLight module")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # [IMPORTANT] lmms-eval's options are unknown here: no prefix matching of them onto ours.
        allow_abbrev=False,
    )
    parser.add_argument("--lmms-help", action="store_true", help="print lmms-eval's evaluation options")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("lmms_eval") is None:
        raise ValueError(INSTALL_HINT)
    if "--lmms-help" in argv:
        argv = ["eval", "--help"]
    register()
    import lmms_eval.__main__ as lmms_entry
    from lmms_eval.cli.dispatch import main as lmms_main

    # [IMPORTANT] lmms-eval 0.7.3 logs a failed evaluation (a model folder that does not load, a bad model_args key)
    # and exits 0; the failure is recorded here and raised once lmms-eval returns, so the command ends with
    # `error: ...` and status 2 (a script or CI sees it).
    failures: list[BaseException] = []
    evaluate_one = lmms_entry.cli_evaluate_single

    def recording(*args, **kwargs):
        try:
            return evaluate_one(*args, **kwargs)
        except Exception as exc:
            failures.append(exc)
            raise

    saved = sys.argv
    sys.argv = ["lmms-eval", *argv]
    lmms_entry.cli_evaluate_single = recording
    try:
        lmms_main()
    finally:
        sys.argv = saved
        lmms_entry.cli_evaluate_single = evaluate_one
    if failures:
        raise failures[0]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
