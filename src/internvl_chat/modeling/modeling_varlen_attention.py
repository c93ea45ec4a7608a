"""Padding-free ("varlen") attention for packed training rows: `attn_implementation="internvl_varlen"`.

    model = InternVLChatForConditionalGeneration.from_pretrained(folder, attn_implementation="internvl_varlen")
    # or in a recipe: attn_implementation: internvl_varlen  (with packing: true)

The packing collator concatenates the samples of a batch into one row and passes `cu_seq_lens_q/k` (int32, (S+1,))
and `max_length_q/k`. With those, each LLM layer calls torch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention
kernels, CUDA) over the concatenated samples: no (T, T) block-diagonal mask, no padding, nothing computed across
sample borders. Without them (generation, padded batches, the vision tower, dropout, torch without `varlen_attn`) the
call is exactly transformers' SDPA path, so one model serves training and inference. On CPU the varlen branch runs a
per-sample SDPA loop (a slow reference used by the tests).
This file is part of the Hub unit: it imports only torch and transformers' public API.
"""

import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTENTION = "internvl_varlen"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_torch_varlen_attn).parameters)
except ImportError:  # pragma: no cover - depends on the installed torch
    _torch_varlen_attn, _VARLEN_PARAMS = None, set()


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    """q (T, Hq, D), k/v (T, Hkv, D) → (T, Hq, D), causal within each segment."""
    # [IMPORTANT] The signature changed across torch releases: 2.10/2.11 take `is_causal` (and maybe no `scale`
    # or GQA), later ones take `window_size=(-1, 0)` for causal plus `scale` and `enable_gqa`.
    kwargs = {}
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * q.shape[-1] ** 0.5)  # the kernel's default scale is D ** -0.5
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return _torch_varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)


def _reference_varlen(q, k, v, cu_q, cu_k, scaling):
    """Per-segment causal SDPA: the same result as the kernel, for CPU and tests. Shapes as `_flash_varlen`."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        qs, ks = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        # (L, H, D) → (H, L, D) for SDPA.
        o = torch.nn.functional.scaled_dot_product_attention(
            q[qs].transpose(0, 1),
            k[ks].transpose(0, 1),
            v[ks].transpose(0, 1),
            is_causal=True,
            scale=scaling,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        out[qs] = o.transpose(0, 1)
    return out


def varlen_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers attention interface: query (B, Hq, T, D), key/value (B, Hkv, T, D) → ((B, T, Hq, D), None)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = (
        cu_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no KV cache in front of the queries
        and getattr(module, "is_causal", True) is not False
        and not (dropout and module.training)
    )
    use_kernel = query.is_cuda and _torch_varlen_attn is not None
    if not packed or (query.is_cuda and not use_kernel):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    cu_k = cu_q if cu_k is None else cu_k
    # (1, H, T, D) → (T, H, D): the kernel's packed layout.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if use_kernel:
        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or max_q
        out = _flash_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scaling)
    else:
        out = _reference_varlen(q, k, v, cu_q, cu_k, scaling)
    return out[None], None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
# The mask stays SDPA's, for the fallback path (padded batches, generation); the varlen branch ignores it.
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
