"""internvl-chat: Hugging Face-native LLaVA-architecture vision-language chat models."""

__version__ = "0.1.0"
