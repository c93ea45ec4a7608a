"""Vision encoders' forward cost: our InternViT-6B vs transformers' InternVLVisionModel (same config, same weights),
and the LLaVA-HR multi-path encoder (CLIP-L + ConvNeXt-L at 768), bf16, one GPU.

    PYTHONPATH=src python3 bench/encoders.py --batch-size 16 --out bench/results/encoders.json
"""

import argparse
import sys

import torch
from common import environment, peak_flops, timed, write


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="bench/results/encoders.json")
    args = parser.parse_args(argv)
    from transformers import InternVLVisionConfig, InternVLVisionModel

    from internvl_chat.modeling.configuration_intern_vit import InternViTConfig
    from internvl_chat.modeling.configuration_multipath import MultiPathVisionConfig
    from internvl_chat.modeling.modeling_intern_vit import InternViTModel
    from internvl_chat.modeling.modeling_multipath import MultiPathVisionModel

    b = args.batch_size
    result = {"env": environment(), "command": "python3 bench/encoders.py " + " ".join(sys.argv[1:]), "batch": b}
    with torch.device("cuda"):
        ours = InternViTModel(InternViTConfig(image_size=224)).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in ours.parameters())
    x = torch.randn(b, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    flops = 2 * params * 577 * b  # matmul FLOPs; attention adds ~3%
    with torch.no_grad():
        t = timed(lambda: ours(x, output_hidden_states=True), warmup=2, repeat=5)
    result["intern_vit_6b_ours"] = {"images_per_s": round(b / t, 1), "mfu": round(flops / t / peak_flops(), 3)}
    print(result["intern_vit_6b_ours"], flush=True)
    native_config = InternVLVisionConfig(
        hidden_size=3200, num_hidden_layers=48, num_attention_heads=25, intermediate_size=12800, image_size=336,
        patch_size=14, norm_type="rms_norm", use_qk_norm=True, attention_bias=False, layer_scale_init_value=0.1,
        use_mean_pooling=True, hidden_act="gelu", layer_norm_eps=1e-6,
    )  # fmt: skip
    ours.to("cpu")
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        native = InternVLVisionModel(native_config).to(torch.bfloat16).eval()
    with torch.no_grad():
        t = timed(lambda: native(x, output_hidden_states=True), warmup=2, repeat=5)
    result["intern_vit_6b_transformers"] = {"images_per_s": round(b / t, 1), "mfu": round(flops / t / peak_flops(), 3)}
    print(result["intern_vit_6b_transformers"], flush=True)
    native.to("cpu")
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        multipath = MultiPathVisionModel(MultiPathVisionConfig(input_image_size=768)).to(torch.bfloat16).eval()
    y = torch.randn(b, 3, 768, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        t = timed(lambda: multipath(y), warmup=2, repeat=5)
    result["multipath_768"] = {
        "images_per_s": round(b / t, 1),
        "params": sum(p.numel() for p in multipath.parameters()),
    }
    print(result["multipath_768"], flush=True)
    write(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
