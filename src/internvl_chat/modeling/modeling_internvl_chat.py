"""InternVL-Chat / LLaVA vision-language model (`model_type = "internvl_chat_llava"`), transformers-native.

Vision tower (CLIP, InternViT-6B or the LLaVA-HR multi-path encoder) → projector (`linear`, `mlp{N}x_gelu`,
`identity`) → any causal LM transformers knows. The skeleton and state-dict names follow transformers' Llava
(`model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head`), so weights convert 1:1.

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=image, text="<image>\\nWhat is this?", return_tensors="pt")
    model.generate(**inputs, max_new_tokens=32)

The processor expands every `<image>` into `image_seq_length` copies of the image token; the model checks that the
number of image tokens equals the number of image features, then `masked_scatter`s the features into them.
This file is part of the Hub unit: it imports only torch, transformers' public API and its sibling files.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging, torch_compilable_check

from .configuration_intern_vit import InternViTConfig
from .configuration_internvl_chat import InternVLChatConfig, check_projector_type
from .configuration_multipath import MultiPathVisionConfig
from .modeling_intern_vit import InternViTModel
from .modeling_multipath import MultiPathVisionModel
from .modeling_varlen_attention import VARLEN_ATTENTION  # noqa: F401  (registers attn_implementation)

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------- version shims
# Every transformers-version difference this file handles lives here. Supported: transformers >= 5.17 (setup.cfg).
# * KV cache name: transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`; its
#   `generate` passes `cache=` to forward and reads `outputs["cache"]`, and an output dataclass declaring
#   `past_key_values` cannot be built there. We pass and read the installed name and accept both as arguments.
#   Delete (use `cache` everywhere) once the minimum transformers is 5.24.
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# ------------------------------------------------------------------------------------------------------------

# Vision tower class per vision `model_type`: one row per tower.
# [IMPORTANT] keyed by model_type, not config class: with trust_remote_code, transformers may import the sibling
# config module more than once, so `isinstance(config, InternViTConfig)` can be False for a genuine InternViTConfig.
VISION_TOWERS = {
    CLIPVisionConfig.model_type: CLIPVisionModel,
    InternViTConfig.model_type: InternViTModel,
    MultiPathVisionConfig.model_type: MultiPathVisionModel,
}


def build_vision_tower(vision_config) -> PreTrainedModel:
    if vision_config.model_type not in VISION_TOWERS:
        raise ValueError(
            f"No vision tower for model_type {vision_config.model_type!r}; known: {sorted(VISION_TOWERS)}"
        )
    return VISION_TOWERS[vision_config.model_type](vision_config)


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@dataclass
class InternVLChatModelOutputWithPast(BaseModelOutputWithPast):
    """Backbone output; `image_hidden_states` are the projected image features, (num_images, tokens, llm_width)."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class InternVLChatCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Causal-LM output + `image_hidden_states`; the cache field is transformers' own (see `CACHE_KWARG`)."""

    image_hidden_states: torch.FloatTensor | None = None


def ignore_non_text_labels(labels, input_ids, attention_mask, image_token_id: int):
    """`labels` with -100 wherever the position holds an image token or padding, whatever the caller passed.

    LLaVA gives image positions no label inside the model (the image features replace the placeholder, with
    IGNORE_INDEX labels), so a collator that copies `input_ids` into `labels` (TRL's default) never teaches the model
    to emit `<image>`. Image positions: `input_ids == image_token_id` (or a label equal to it, e.g. with
    `inputs_embeds`); padding: a 2-D `attention_mask` equal to 0. Shapes (batch, seq); returns a new tensor.
    """
    ignore = labels == image_token_id
    if input_ids is not None and input_ids.shape == labels.shape:
        ignore = ignore | (input_ids.to(labels.device) == image_token_id)
    if torch.is_tensor(attention_mask) and attention_mask.shape == labels.shape:
        ignore = ignore | (attention_mask.to(labels.device) == 0)
    return labels.masked_fill(ignore, -100)


def _ignore_non_text_labels_hook(module, args, kwargs):
    # [IMPORTANT] a forward pre-hook, so the rule also holds when `forward` is replaced on the instance: TRL's
    # SFTTrainer patches it with a fused LM head that reads `labels` itself and never runs our forward's loss.
    labels = kwargs.get("labels")
    if labels is None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    kwargs["labels"] = ignore_non_text_labels(
        labels, input_ids, kwargs.get("attention_mask"), module.config.image_token_id
    )
    return args, kwargs


SUPERVISED_REDUCTIONS = ("mean", "none", "row_sum")


def supervised_cross_entropy(
    lm_head,
    hidden_states,
    labels,
    num_items_in_batch=None,
    chunk_size: int = 4096,
    reduction: str = "mean",
    token_stats: bool = False,
):
    """Next-token cross-entropy computed only where the shifted label is not -100, in chunks of positions.

    hidden_states: (batch, seq, width); labels: (batch, seq), -100 = not supervised. Position j predicts label j+1.
    reduction:
      * "mean" (default): scalar, the same value as transformers' `ForCausalLMLoss` on full logits (float32 logits,
        sum over supervised tokens divided by `num_items_in_batch` or their count), without the (batch, seq, vocab)
        logits tensor;
      * "none": float32 per-token losses (n_supervised,), in row-major order of the supervised positions
        (`labels[:, 1:] != -100`);
      * "row_sum": float32 per-row loss sums (batch,); divide by `(labels[:, 1:] != -100).sum(-1)` for row means.
    token_stats=True (with reduction="none" only) returns `(losses, entropy, correct)`: per supervised token the
    float32 loss, the predictive entropy (no gradient) and whether the greedy prediction is the label (bool).
    """
    if reduction not in SUPERVISED_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SUPERVISED_REDUCTIONS}, got {reduction!r}")
    if token_stats and reduction != "none":
        raise ValueError("token_stats=True needs reduction='none'")
    shift_labels = labels[:, 1:].to(hidden_states.device)
    mask = shift_labels != -100
    selected = hidden_states[:, :-1][mask]  # (n_supervised, width)
    targets = shift_labels[mask]
    per_token, entropies, correct = [], [], []
    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = lm_head(selected[start : start + chunk_size]).float()  # (chunk, vocab)
        chunk_targets = targets[start : start + chunk_size]
        if reduction == "mean":
            total = total + nn.functional.cross_entropy(logits, chunk_targets, reduction="sum")
            continue
        per_token.append(nn.functional.cross_entropy(logits, chunk_targets, reduction="none"))
        if token_stats:
            with torch.no_grad():
                log_probs = torch.log_softmax(logits, dim=-1)
                entropies.append(-(log_probs.exp() * log_probs).sum(-1))
                correct.append(logits.argmax(-1) == chunk_targets)
    if reduction == "mean":
        if num_items_in_batch is None:
            return total / mask.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    losses = torch.cat(per_token) if per_token else hidden_states.new_zeros((0,), dtype=torch.float32)
    if reduction == "row_sum":
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
        return losses.new_zeros(mask.shape[0]).index_add(0, rows, losses)
    if token_stats:
        empty = losses.new_zeros((0,))
        entropy = torch.cat(entropies) if entropies else empty
        hits = torch.cat(correct) if correct else empty.bool()
        return losses, entropy, hits
    return losses


class InternVLChatProjector(nn.Module):
    """LLaVA's projector. `mlp{N}x_gelu`: Linear(vision→llm), then (N-1) × [exact-erf GELU, Linear(llm→llm)].

    Layers are named `linear_1 ... linear_N` so `mlp2x_gelu` has exactly transformers-Llava's keys
    (`linear_1`, `linear_2`; the original's `mm_projector.0` / `.2`).
    """

    def __init__(self, config: InternVLChatConfig):
        super().__init__()
        self.num_linear = check_projector_type(config.projector_type)
        vision_width, llm_width = config.vision_config.hidden_size, config.text_config.hidden_size
        if self.num_linear == 0 and vision_width != llm_width:
            raise ValueError(
                f"projector_type 'identity' needs equal widths, got vision {vision_width} and LLM {llm_width}."
            )
        for i in range(self.num_linear):
            setattr(self, f"linear_{i + 1}", nn.Linear(vision_width if i == 0 else llm_width, llm_width))
        self.act = nn.GELU()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden_states = image_features
        for i in range(self.num_linear):
            if i > 0:
                hidden_states = self.act(hidden_states)
            hidden_states = getattr(self, f"linear_{i + 1}")(hidden_states)
        return hidden_states


class InternVLChatPreTrainedModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # `_no_split_modules` (layers FSDP wraps and device_map never splits) is gathered by transformers from the
    # tower's and the LLM's own lists in `post_init`.
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        # safetensors >= 0.8 writes weight files through a private temporary file (mode 0600); give them the mode
        # every other file of the folder gets (0666 minus the umask), so a saved model is readable like the rest.
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(save_directory):
            if name.endswith(".safetensors"):
                os.chmod(os.path.join(save_directory, name), 0o666 & ~umask)

    def _init_weights(self, module):
        # Towers and the LLM initialise their own modules (their `_init_weights` run on their children); here only
        # the projector, with the LLM's initializer range as LLaVA does.
        if isinstance(module, nn.Linear):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class InternVLChatModel(InternVLChatPreTrainedModel):
    """Vision tower + projector + LLM backbone; returns hidden states aligned with `input_ids` (no LM head)."""

    def __init__(self, config: InternVLChatConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.multi_modal_projector = InternVLChatProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, 3, H, W) → projected features (num_images, image_seq_length, llm_width)."""
        tower = self.vision_tower
        pixel_values = pixel_values.to(dtype=tower.dtype)
        # A frozen tower (stages 1 and 2 of LLaVA) needs no autograd graph: running it under no_grad stores no
        # activations and skips its gradient checkpointing.
        frozen = not any(p.requires_grad for p in tower.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = self._select_features(tower, pixel_values)
        return self.multi_modal_projector(features)

    def _blank_pixel_values(self, like: torch.Tensor) -> torch.Tensor:
        """One all-zero image (1, 3, S, S) at the tower's input size."""
        size = self.config.input_image_size or self.config.vision_config.image_size
        return torch.zeros(1, 3, size, size, device=like.device, dtype=like.dtype)

    def _select_features(self, tower, pixel_values):
        if self.config.is_multipath_encoder:
            # The multi-path encoder returns its fused fast/slow tokens: no select layer, no CLS.
            features = tower(pixel_values, return_dict=True).last_hidden_state
        else:
            outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
            # hidden_states: embeddings output, then one entry per block; -2 is block 23 of 24 for CLIP-L (no
            # post-layernorm), -4 for the 48-block InternViT-6B.
            features = outputs.hidden_states[self.config.vision_feature_layer]
            if self.config.vision_feature_select_strategy == "patch":
                features = features[:, 1:]
        return features

    def merge_image_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Writes `image_features` (num_images, tokens, width) into the image-token positions of `inputs_embeds`."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            image_mask = (inputs_embeds == image_embed).all(-1)
        else:
            image_mask = input_ids == self.config.image_token_id
        n_tokens = image_mask.sum()
        n_features = image_features.shape[0] * image_features.shape[1]
        # A tensor condition (no `.item()` / `int()`), so the check does not break a torch.compile graph.
        torch_compilable_check(
            n_tokens == n_features,
            lambda: (
                f"Image features and image tokens do not match: {int(n_tokens)} image tokens in the input but "
                f"{n_features} image features ({image_features.shape[0]} images × {image_features.shape[1]} "
                "tokens). Each image needs exactly one `<image>` placeholder, expanded by the processor; check that "
                "no truncation cut the image tokens."
            ),
        )
        image_mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(image_mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> InternVLChatModelOutputWithPast:
        """Returns an `InternVLChatModelOutputWithPast`, or its tuple with `return_dict=False`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = kwargs.pop("cache", None)
        past_key_values = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.get_image_features(pixel_values)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        elif (
            input_ids is not None and past_key_values is None and bool((input_ids == self.config.image_token_id).any())
        ):
            raise ValueError(
                f"The input holds {int((input_ids == self.config.image_token_id).sum())} image tokens but no "
                "pixel_values were given (0 image features)."
            )
        elif self.training and _distributed_world_size() > 1:
            # [IMPORTANT] sharded training (FSDP, ZeRO-3) gathers the tower's and projector's weights with
            # collectives that every rank must join, and DDP expects the same parameters used on every rank: a batch
            # without images would skip them on one rank and hang or desync the others (seen: gloo "collective
            # mismatch" with FSDP2). Run them on one blank image and add 0 x the result (LLaVA feeds a zero image to
            # text-only samples for the same reason); the values and gradients are unchanged.
            blank = self.get_image_features(self._blank_pixel_values(inputs_embeds))
            inputs_embeds = inputs_embeds + 0.0 * blank.sum()

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: past_key_values},
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        return InternVLChatModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class InternVLChatForConditionalGeneration(InternVLChatPreTrainedModel, GenerationMixin):
    """The full chat model: `InternVLChatModel` + `lm_head`, with `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: InternVLChatConfig):
        super().__init__(config)
        self.model = InternVLChatModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.register_forward_pre_hook(_ignore_non_text_labels_hook, with_kwargs=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> InternVLChatCausalLMOutputWithPast:
        """Causal-LM forward. With `labels` and `skip_logits=True` the loss is computed from the supervised positions
        only (no full-vocabulary logits; `logits` is None), the training fast path. Labels at image-token and padding
        positions are ignored whatever the caller passed (`ignore_non_text_labels`). `return_dict=False` gives the
        output's tuple."""
        if labels is not None:
            labels = ignore_non_text_labels(labels, input_ids, attention_mask, self.config.image_token_id)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,  # transformers >= 5.24 passes `cache=` in kwargs: the backbone takes both
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None and skip_logits:
            # Project only the supervised positions through lm_head: image, prompt and padding tokens (most of a
            # LLaVA sample) never get full-vocabulary logits. `logits` is None in this mode.
            loss = supervised_cross_entropy(self.lm_head, hidden_states, labels, kwargs.get("num_items_in_batch"))
        else:
            # logits_to_keep=0 keeps every position; an int N keeps the last N (generation needs only the last).
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        return InternVLChatCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )
