"""internvl-chat: Hugging Face-native LLaVA-architecture vision-language chat models.

`import internvl_chat` registers the model, config, image processor and processor with transformers' Auto classes,
so `AutoModelForImageTextToText.from_pretrained(folder)` works locally; saved folders also carry the code
(`auto_map`) for `trust_remote_code=True` loads where the package is not installed.
"""

import os
import sys

__version__ = "0.1.0"

_MODELING_EXPORTS = (
    "InternVLChatConfig",
    "InternVLChatForConditionalGeneration",
    "InternVLChatImageProcessor",
    "InternVLChatModel",
    "InternVLChatProcessor",
    "register_auto_classes",
)
__all__ = list(_MODELING_EXPORTS)


def __getattr__(name):
    # The classes come from .modeling (torch + transformers) on first use.
    if name in _MODELING_EXPORTS:
        from . import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'internvl_chat' has no attribute {name!r}")


# The `internvl-chat` console script parses its arguments before torch / transformers are imported (so `--help`
# and argument errors answer at once) and registers the Auto classes itself afterwards (cli.main); every other
# importer gets them registered now.
if not sys.argv or os.path.basename(sys.argv[0]) != "internvl-chat":
    from .modeling import register_auto_classes as _register

    _register()
