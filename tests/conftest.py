"""Shared fixtures: tiny random models, and the real tokenizers kept in the repository under tests/fixtures/tokenizers
(Vicuna-7B-v1.5, Phi-3.5-mini-instruct and Llama-3.1-8B-Instruct tokenizer files; no weights)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"


def tiny_clip_llama_config(**overrides):
    """A tiny CLIP + Llama InternVLChatConfig (56px input, 14px patches → 16 image tokens)."""
    from internvl_chat import InternVLChatConfig

    kwargs = dict(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": 256,
            "pad_token_id": 0,
        },
        projector_type="mlp2x_gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="patch",
        image_token_id=100,
        image_seq_length=16,
    )
    kwargs.update(overrides)
    return InternVLChatConfig(**kwargs)


@pytest.fixture
def tiny_config():
    return tiny_clip_llama_config()


@pytest.fixture
def tiny_model(tiny_config):
    from internvl_chat import InternVLChatForConditionalGeneration

    torch.manual_seed(0)
    return InternVLChatForConditionalGeneration(tiny_config).eval()
