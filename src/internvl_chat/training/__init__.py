"""Training: two-stage LLaVA-family recipes on TRL's SFTTrainer (`internvl-chat train RECIPE.yaml`).

A verb: builds on factories / loading / data and imports no other verb (tests/test_layers.py).

stages.py    trainable sets per stage (align / finetune, freeze_*, tune_vit_from_layer...) and LR groups
build.py     the model a recipe starts from (saved folder, pretrained LLM + tower, tiny preset)
trainer.py   VisionSFTTrainer / VisionSFTConfig: optimizer groups, modality sampler, projector artifact, LoRA
collator.py  VisionChatCollator: batches, padding, padding-free packing around data.encoding.SampleEncoder
train.py     recipe YAML + overrides -> run; the `train` verb
blocks.py    the one validator of recipe blocks (model, stage, data, lora: unknown keys named)
toydata.py   the built-in digits + letters dataset (demo, tiny recipes)
configs/     DeepSpeed ZeRO-2 / ZeRO-3 (+ offload) JSON, accelerate FSDP YAML
"""
