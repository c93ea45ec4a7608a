"""internvl-chat: Hugging Face-native LLaVA-architecture vision-language chat models.

`import internvl_chat` registers the model, config, image processor and processor with transformers' Auto classes,
so `AutoModelForImageTextToText.from_pretrained(folder)` works locally; saved folders also carry the code
(`auto_map`) for `trust_remote_code=True` loads where the package is not installed.
"""

from .modeling import (  # noqa: F401
    InternVLChatConfig,
    InternVLChatForConditionalGeneration,
    InternVLChatImageProcessor,
    InternVLChatModel,
    InternVLChatProcessor,
    register_auto_classes,
)

__version__ = "0.1.0"

register_auto_classes()
