"""Fresh-process smoke test of a saved folder: run with `python -S` so that `internvl_chat` is NOT importable.

    python -S tests/scripts/remote_smoke.py SITE_PACKAGES FOLDER OUT.pt

Loads the folder with trust_remote_code=True (HF_HUB_OFFLINE=1 set by the caller), computes logits on fixed inputs,
generates greedily, runs pipeline("image-text-to-text") on chat messages with an image, and saves everything to OUT.pt.
"""

import sys

sys.path[:0] = [p for p in sys.argv[1].split(":") if p]
site, folder, out_path = sys.argv[1:4]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline  # noqa: E402

try:
    import internvl_chat  # noqa: F401

    raise SystemExit("internvl_chat must not be importable in the smoke test")
except ImportError:
    pass

model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
image = Image.fromarray((np.random.default_rng(0).random((40, 64, 3)) * 255).astype("uint8"))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
pipe = pipeline("image-text-to-text", model=model, processor=processor)
chat = [
    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is in the image?"}]}
]
answer = pipe(text=chat, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
torch.save(
    {
        "transformers": transformers.__version__,
        "prompt": prompt,
        "input_ids": inputs["input_ids"],
        "pixel_values": inputs["pixel_values"],
        "logits": logits,
        "generated": generated,
        "answer": answer,
        "backbone_class": type(backbone).__name__,
        "model_module": type(model).__module__,
    },
    out_path,
)
