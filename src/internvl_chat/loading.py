"""The one model loader behind every verb (chat, serve, web, eval, caption, select, training's quantized load):
dtype, device / device map, bitsandbytes quantization, an unmerged LoRA adapter on its base, and the remote-code
policy. The command-line options for it are `add_model_args` / `model_kwargs`.

    internvl-chat serve --model DIR [--dtype auto|float32|bfloat16|float16] [--device cpu|cuda|cuda:1]
                        [--device-map auto] [--load-4bit | --load-8bit] [--model-base BASE]
                        [--attn-implementation sdpa|eager|flash_attention_2]

    from internvl_chat.loading import add_model_args, load_model
    add_model_args(parser); model, processor = load_model(**model_kwargs(parser.parse_args()))

* `--device-map auto` spreads the model over every visible GPU (accelerate); `--device` puts it on one device.
* `--load-4bit` / `--load-8bit` quantize the LLM with bitsandbytes (CUDA only; the vision tower and projector
  stay in `--dtype`, as LLaVA does).
* Remote code: our own `model_type` (`internvl_chat_llava`) always loads with the installed classes, so a folder's
  `*.py` files never run; any other model type needs an explicit `trust_remote_code=True`
  (`--trust-remote-code`), as transformers itself requires.
* `--model-base BASE --model ADAPTER` serves an unmerged LoRA adapter (peft): the base checkpoint is loaded,
  the adapter applied and merged in memory (merged weights generate faster and batch the same).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# [IMPORTANT] torch is imported where it is used, not here: the verbs' argument parsers import this module, and
# `--help` must answer before torch loads. `DTYPES` (name -> torch dtype) is built on first access.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def __getattr__(name: str):
    if name == "DTYPES":
        import torch

        return {n: getattr(torch, n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_dtype(name: str):
    """A dtype name of `DTYPE_NAMES` → the torch dtype; ``"auto"`` stays ``"auto"`` (from_pretrained's own rule)."""
    if name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of auto, {', '.join(DTYPE_NAMES)}.")
    import torch

    return getattr(torch, name)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to change."""


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, help="model folder (or LoRA adapter folder with --model-base)")
    group.add_argument("--model-base", help="base model folder when --model is an unmerged LoRA adapter (peft)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_NAMES],
        help="weights dtype; auto = bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    group.add_argument("--device-map", help="'auto' spreads the model over all visible GPUs (needs accelerate)")
    quant = group.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="4-bit NF4 quantized LLM (bitsandbytes, CUDA)")
    quant.add_argument("--load-8bit", action="store_true", help="8-bit quantized LLM (bitsandbytes, CUDA)")
    group.add_argument("--attn-implementation", help="sdpa (default), eager or flash_attention_2")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder of another model_type to run its own Python code (ours never needs it)",
    )
    return parser


def model_kwargs(args: argparse.Namespace) -> dict:
    """The `load_model` keyword arguments from parsed `add_model_args` options."""
    return dict(
        model=args.model,
        model_base=args.model_base,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        load_4bit=args.load_4bit,
        load_8bit=args.load_8bit,
        attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
    )


def default_device() -> str:
    """``cuda`` when available (``cuda:LOCAL_RANK`` in a process started by torchrun / accelerate launch, so the
    processes of a data-parallel run do not all land on GPU 0), else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    return f"cuda:{local_rank}" if local_rank >= 0 else "cuda"


def resolve_dtype(dtype: str, device: str, cuda_auto: str = "bfloat16") -> torch.dtype:
    """`auto` is float32 on CPU; on CUDA `cuda_auto` (bfloat16 when supported, else float16; eval asks float16,
    LLaVA's evaluation dtype)."""
    import torch

    if dtype != "auto":
        if dtype not in DTYPE_NAMES:
            raise ModelLoadError(f"Unknown --dtype {dtype!r}; choose one of auto, {', '.join(DTYPE_NAMES)}.")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        if cuda_auto == "float16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return torch.float32


def quantization_config(bits: int, dtype: torch.dtype):
    """bitsandbytes config quantizing the LLM only (4 = NF4 with double quantization, 8 = int8); None for 16."""
    import torch

    if bits not in (4, 8):
        return None
    # [IMPORTANT] import lazily: bitsandbytes is optional and imports CUDA libraries at import time.
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "4/8-bit loading (--load-4bit / --load-8bit, recipe `bits`) needs bitsandbytes, which is not installed: "
            "pip install 'internvl-chat[quant]' (CUDA GPUs only)."
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(
            "4/8-bit loading (--load-4bit / --load-8bit, recipe `bits`) needs a CUDA GPU (bitsandbytes); "
            "none is visible."
        )
    from transformers import BitsAndBytesConfig

    # LLaVA's builder: quantize the LLM only; the vision tower and the projector are small and precision-sensitive.
    skip = ["vision_tower", "multi_modal_projector", "lm_head"]
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


OUR_MODEL_TYPE = "internvl_chat_llava"


def check_remote_code(folder: str, trust_remote_code: bool) -> None:
    """Refuses a folder whose model type is not ours unless remote code is explicitly trusted.

    Ours resolves to the installed classes (registered by `import internvl_chat`), so `auto_map` code in the folder
    is never imported; another model type with an `auto_map` would run the folder's `configuration_*.py`.
    """
    import json

    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{config_file}: cannot read the model config ({err}).") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != OUR_MODEL_TYPE and not trust_remote_code and isinstance(config, dict) and "auto_map" in config:
        raise ModelLoadError(
            f"{folder}: model_type {model_type!r} is not {OUR_MODEL_TYPE!r} and ships its own code (auto_map); "
            "pass --trust-remote-code if you trust that code."
        )


def _check_folder(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise ModelLoadError(f"{what} {path!r} is not a folder (models are loaded from local folders).")


def load_model(
    model: str,
    model_base: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    load_4bit: bool = False,
    load_8bit: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    cuda_auto_dtype: str = "bfloat16",
):
    """Loads (model, processor) for inference (eval mode). Raises ModelLoadError with a clear message."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import internvl_chat  # noqa: F401  (registers the Auto classes; no trust_remote_code needed for our models)

    if load_4bit and load_8bit:
        raise ModelLoadError("Pass only one of --load-4bit and --load-8bit.")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device, cuda_auto_dtype)
    quantization = quantization_config(4 if load_4bit else 8 if load_8bit else 16, torch_dtype)

    weights_folder = model_base or model
    _check_folder(weights_folder, "--model-base" if model_base else "--model")
    if model_base:
        _check_folder(model, "--model (LoRA adapter)")
        if not (Path(model) / "adapter_config.json").is_file():
            raise ModelLoadError(f"--model {model!r} has no adapter_config.json: it is not a peft LoRA adapter.")

    check_remote_code(weights_folder, trust_remote_code)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = device_map or {"": device if ":" in device else f"{device}:0"}
    elif device_map:
        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError("--device-map needs accelerate: pip install accelerate.")
        kwargs["device_map"] = device_map
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(weights_folder, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"Could not load the model from {weights_folder!r}: {err}") from err
    if "device_map" not in kwargs:
        loaded = loaded.to(device)

    if model_base:
        if importlib.util.find_spec("peft") is None:
            raise ModelLoadError("--model-base (LoRA adapter) needs peft: pip install peft.")
        from peft import PeftModel

        logger.info("applying the LoRA adapter %s to %s", model, model_base)
        loaded = PeftModel.from_pretrained(loaded, model)
        if quantization is None:
            loaded = loaded.merge_and_unload()
        # else: 4/8-bit base weights cannot take the merge; peft runs the adapter unmerged.

    # The processor: the adapter folder's own when training saved one (a changed tokenizer or template), else the
    # base model's.
    processor_folder = model if model_base and (Path(model) / "processor_config.json").is_file() else weights_folder
    try:
        processor = AutoProcessor.from_pretrained(processor_folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the processor from {processor_folder!r}: {err}") from err
    # [IMPORTANT] batched generation needs left padding; a processor saved by a training run may say "right".
    processor.tokenizer.padding_side = "left"
    loaded.eval()
    logger.info(
        "loaded %s (%s, %s%s)",
        os.path.basename(os.path.normpath(model)),
        str(torch_dtype).replace("torch.", ""),
        getattr(loaded, "hf_device_map", None) or loaded.device,
        ", 4-bit" if load_4bit else ", 8-bit" if load_8bit else "",
    )
    return loaded, processor
