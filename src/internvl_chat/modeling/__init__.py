"""The Hub unit: flat files copied into every saved checkpoint, loadable with `trust_remote_code=True`.

`register_auto_classes()` (called by `import internvl_chat`) registers them with transformers' Auto classes for
local use, and marks them so `save_pretrained` writes `auto_map` and copies these files next to the weights.
The rules every layer shares live here once: `tokenize_llava` (LLaVA's piecewise tokenization),
`supervised_token_mask` (which tokens an answer span supervises), `ignore_non_text_labels` (image and padding
positions never supervised) and `supervised_cross_entropy` (the loss on supervised positions).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_internvl_chat import InternVLChatConfig
from .image_processing_internvl_chat import InternVLChatImageProcessor
from .modeling_internvl_chat import (
    InternVLChatForConditionalGeneration,
    InternVLChatModel,
    InternVLChatPreTrainedModel,
    ignore_non_text_labels,
    supervised_cross_entropy,
)
from .processing_internvl_chat import IMAGE_TOKEN, InternVLChatProcessor, supervised_token_mask, tokenize_llava

__all__ = [
    "IMAGE_TOKEN",
    "InternVLChatConfig",
    "InternVLChatForConditionalGeneration",
    "InternVLChatImageProcessor",
    "InternVLChatModel",
    "InternVLChatPreTrainedModel",
    "InternVLChatProcessor",
    "ignore_non_text_labels",
    "register_auto_classes",
    "supervised_cross_entropy",
    "supervised_token_mask",
    "tokenize_llava",
]


def register_auto_classes() -> None:
    """Registers config, models, image processor and processor with the Auto classes (idempotent)."""
    model_type = InternVLChatConfig.model_type
    AutoConfig.register(model_type, InternVLChatConfig, exist_ok=True)
    AutoModel.register(InternVLChatConfig, InternVLChatModel, exist_ok=True)
    AutoModelForImageTextToText.register(InternVLChatConfig, InternVLChatForConditionalGeneration, exist_ok=True)
    # One processor (PIL + numpy, no torchvision path) answers both backends: AutoImageProcessor asks for the
    # "torchvision" backend whenever torchvision is installed, and a "pil"-only entry made every load warn and fall
    # back to it.
    AutoImageProcessor.register(
        InternVLChatConfig,
        image_processor_classes={"pil": InternVLChatImageProcessor, "torchvision": InternVLChatImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(InternVLChatConfig, InternVLChatProcessor, exist_ok=True)

    InternVLChatConfig.register_for_auto_class()
    InternVLChatModel.register_for_auto_class("AutoModel")
    InternVLChatForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    InternVLChatImageProcessor.register_for_auto_class("AutoImageProcessor")
    InternVLChatProcessor.register_for_auto_class("AutoProcessor")
