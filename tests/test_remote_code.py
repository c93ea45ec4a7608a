"""Save → fresh process without the package → trust_remote_code load → same logits; pipeline answers.

Runs against the installed transformers and, when INTERNVL_CHAT_COMPAT_PATH points at an overlay holding
transformers 5.17 (the oldest supported; `.ci/run` builds it), against that version too.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import TOKENIZERS

SCRIPT = Path(__file__).parent / "scripts" / "remote_smoke.py"
SITE = str(Path(transformers.__file__).parent.parent)
COMPAT = os.environ.get("INTERNVL_CHAT_COMPAT_PATH", "")

VERSIONS = [pytest.param("", id=f"transformers-{transformers.__version__}")]
if COMPAT:
    VERSIONS.append(pytest.param(COMPAT, id="transformers-compat"))


# One preset per vision tower: CLIP, InternViT-6B (224 tower run larger), multi-path CLIP + ConvNeXt.
PRESETS = {
    "llava-v1.5-7b": ("vicuna-v1.5", "USER: <image>\nWhat is in the image? ASSISTANT:"),
    "internvl-chat-vit6b-224to336-vicuna-7b": ("vicuna-v1.5", "USER: <image>\nWhat is in the image? ASSISTANT:"),
    "llavar2-phi3.5-mini": ("phi-3.5-mini", "<|user|>\n<image>\nWhat is in the image?<|end|>\n<|assistant|>\n"),
}
_saved = {}


def saved_model(preset, tmp_path_factory):
    from internvl_chat.factories import create

    if preset not in _saved:
        folder = tmp_path_factory.mktemp(preset)
        tokenizer = str(TOKENIZERS / PRESETS[preset][0])
        model, processor, _ = create(preset, str(folder), tokenizer=tokenizer, tiny=True)
        _saved[preset] = (folder, model.eval(), processor)
    return _saved[preset]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("overlay", VERSIONS)
def test_fresh_process_trust_remote_code_load(preset, overlay, tmp_path, tmp_path_factory):
    folder, model, processor = saved_model(preset, tmp_path_factory)
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), f"{overlay}:{SITE}", str(folder), str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(out, weights_only=False)
    if overlay:
        assert remote["transformers"].startswith("5.17"), remote["transformers"]
    assert remote["model_module"].startswith("transformers_modules"), remote["model_module"]
    assert remote["backbone_class"] == "InternVLChatModel"
    assert remote["prompt"].endswith(PRESETS[preset][1])

    # The same inputs through the in-process model: identical processing and logits.
    with torch.no_grad():
        local = model(input_ids=remote["input_ids"], pixel_values=remote["pixel_values"]).logits
    diff = (local - remote["logits"]).abs().max().item()
    print(f"fresh-process logits diff ({remote['transformers']}): {diff:.3e}")
    assert diff <= 1e-5
    assert remote["generated"].shape[1] > remote["input_ids"].shape[1]
    assert isinstance(remote["answer"], str) and remote["answer"]
