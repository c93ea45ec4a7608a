"""Training: trainable sets of the tiny recipes after two real steps, resume after a kill, sampler, recipes.

Every tiny recipe runs two optimizer steps through `internvl_chat.training.train.run` (TRL SFTTrainer, our collator):
every parameter of the trainable set must change and every other one must stay bit-identical. Warmup is overridden
to 0 so both steps update (LoRA's B and the multi-path adapters' projections start at zero, so their upstream
weights only get a gradient at step 2).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZERS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny"


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    from internvl_chat.training.toydata import write_toy_dataset

    folder = tmp_path_factory.mktemp("toy")
    write_toy_dataset(folder)
    return str(folder)


def tiny_recipe(name, out, toy_folder, **overrides):
    from internvl_chat.training.train import apply_overrides, load_recipe

    recipe = load_recipe(TINY / f"{name}.yaml")
    recipe["model"]["tokenizer"] = str(TOKENIZERS / Path(recipe["model"]["tokenizer"]).name)
    flat = {
        "--training.output_dir": str(out),
        "--data.builtin_folder": toy_folder,
        "--training.warmup_ratio": "0",
        "--training.disable_tqdm": "true",
    }
    flat.update({f"--{k}": str(v) for k, v in overrides.items()})
    return apply_overrides(recipe, [x for kv in flat.items() for x in kv])


class Snapshot:
    """TrainerCallback: copies every parameter (and which ones train) when training starts."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                outer.before = {n: p.detach().clone() for n, p in model.named_parameters()}
                outer.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

        self.callback = _CB()


def run_two_steps(name, tmp_path, toy_folder, **overrides):
    from internvl_chat.training.train import run

    snap = Snapshot()
    summary = run(tiny_recipe(name, tmp_path / name, toy_folder, **overrides), callbacks=[snap.callback])
    model = summary["trainer"].model
    after = dict(model.named_parameters())
    changed = {n for n in snap.before if not torch.equal(snap.before[n], after[n].detach())}
    assert summary["global_step"] == 2
    assert summary["dropped_leading_assistant"] == 0  # the toy data has none (counted: tests/test_data.py)
    return snap.trainable, changed, set(snap.before), summary


def check_exact(trainable, changed):
    assert trainable, "nothing trains"
    frozen_changed = sorted(changed - trainable)
    assert not frozen_changed, f"frozen parameters changed: {frozen_changed[:5]}"
    unchanged = sorted(trainable - changed)
    assert not unchanged, f"trainable parameters did not change: {unchanged[:5]}"


@pytest.fixture(scope="module")
def projectors(tmp_path_factory, toy_folder):
    """Stage-1 runs (tiny LLaVA and LLaVAR-2): their trainable sets and projector artifacts."""
    out = {}
    for name in ("llava-align", "llavar2-align"):
        tmp = tmp_path_factory.mktemp(name)
        trainable, changed, names, summary = run_two_steps(name, tmp, toy_folder)
        out[name] = (trainable, changed, names, summary["written"]["projector"])
    return out


def test_align_trains_exactly_the_projector(projectors):
    trainable, changed, names, artifact = projectors["llava-align"]
    check_exact(trainable, changed)
    assert trainable == {n for n in names if n.startswith("model.multi_modal_projector.")}
    from safetensors.torch import load_file

    assert set(load_file(artifact)) == trainable  # the stage-1 artifact holds exactly what stage 1 trained


def test_multipath_align_trains_projector_and_fusion(projectors):
    trainable, changed, names, artifact = projectors["llavar2-align"]
    check_exact(trainable, changed)
    prefixes = ("model.multi_modal_projector.", "model.vision_tower.align_stages.")
    assert trainable == {n for n in names if n.startswith(prefixes)}
    assert any("align_stages" in n for n in trainable)


def test_finetune_from_projector_trains_llm_and_projector(projectors, tmp_path, toy_folder):
    artifact = projectors["llava-align"][3]
    trainable, changed, names, summary = run_two_steps(
        "llava-finetune", tmp_path, toy_folder, **{"model.pretrain_mm_mlp_adapter": artifact}
    )
    check_exact(trainable, changed)
    assert trainable == {n for n in names if not n.startswith("model.vision_tower.")}
    # stage 2 started from the stage-1 projector
    from safetensors.torch import load_file

    from internvl_chat import InternVLChatForConditionalGeneration

    saved = InternVLChatForConditionalGeneration.from_pretrained(summary["output_dir"])
    assert saved.config.image_token_id == summary["trainer"].model.config.image_token_id
    assert (Path(summary["output_dir"]) / "loss_curve.png").stat().st_size > 1000
    assert load_file(artifact)  # unchanged file, still loadable


def test_sharegpt4v_partial_tower(tmp_path, toy_folder):
    trainable, changed, names, _ = run_two_steps("sharegpt4v-align", tmp_path, toy_folder)
    check_exact(trainable, changed)
    vision = {n for n in trainable if n.startswith("model.vision_tower.")}
    # 4 tiny CLIP blocks, select layer -2: block 2 is the only one >= 2 that feeds the features; block 3,
    # embeddings, pre_layrnorm and post_layernorm stay frozen.
    assert vision and all(n.startswith("model.vision_tower.encoder.layers.2.") for n in vision)
    assert {n for n in names if n.startswith("model.vision_tower.encoder.layers.2.")} == vision
    assert {n for n in names if n.startswith(("model.language_model.", "lm_head.", "model.multi_modal_"))} <= trainable


def test_lora_targets_only_llm_linears(projectors, tmp_path, toy_folder):
    artifact = projectors["llava-align"][3]
    trainable, changed, names, summary = run_two_steps(
        "llava-lora", tmp_path, toy_folder, **{"model.pretrain_mm_mlp_adapter": artifact}
    )
    check_exact(trainable, changed)
    lora = {n for n in trainable if ".lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    assert {n for n in trainable - lora} == {n for n in names if "multi_modal_projector.modules_to_save.default." in n}
    leaves = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the projector runs at mm_projector_lr, the adapters at learning_rate
    lrs = sorted({g["initial_lr"] for g in summary["trainer"].optimizer.param_groups})
    assert lrs == [2e-5, 2e-4]
    assert (Path(summary["output_dir"]) / "adapter_config.json").exists()


def test_multipath_finetune_trains_vision_side_and_adapters(projectors, tmp_path, toy_folder):
    artifact = projectors["llavar2-align"][3]
    # [IMPORTANT] a random ConvNeXt block scales its output by gamma = 1e-6 (timm's layer-scale init), so the
    # block norms get ~1e-12 gradients: at lr 2e-5 Adam's step (grad/eps-bounded) is below float32 resolution of
    # a weight of 1.0 and the test would see "no change". lr 1e-2 makes every step representable.
    trainable, changed, names, _ = run_two_steps(
        "llavar2-finetune",
        tmp_path,
        toy_folder,
        **{"model.pretrain_mm_mlp_adapter": artifact, "training.learning_rate": 1e-2},
    )
    check_exact(trainable, changed)
    assert any(n.startswith("model.vision_tower.align_stages_latent.") for n in trainable)
    assert any(n.startswith("model.vision_tower.slow_vision_tower.") for n in trainable)
    frozen = names - trainable
    # only what the multi-path encoder never uses: the fast CLS token and the fast post-layernorm
    assert frozen == {
        "model.vision_tower.fast_vision_tower.embeddings.class_embedding",
        "model.vision_tower.fast_vision_tower.post_layernorm.weight",
        "model.vision_tower.fast_vision_tower.post_layernorm.bias",
    }


def test_vision_stage_needs_a_model_built_with_adapters():
    """The recipe flag `freeze_vision: false` (LLaVA-HR's) builds the multi-path model with `use_adapters`; a model
    built without them is refused by apply_stage instead of training a vision side that lacks its adapters."""
    from internvl_chat.training.build import ModelConfig, build_model
    from internvl_chat.training.stages import StageConfig, apply_stage

    cfg = ModelConfig(preset="llavar2-phi3.5-mini", tiny=True, tokenizer=str(TOKENIZERS / "phi-3.5-mini"))
    stage2 = StageConfig(stage="finetune", freeze_vision=False)
    model, _ = build_model(cfg, freeze_vision=False)
    assert model.config.vision_config.use_adapters and hasattr(model.model.vision_tower, "align_stages_latent")
    apply_stage(model, stage2)
    stage1_model, _ = build_model(cfg, freeze_vision=True)
    assert not stage1_model.config.vision_config.use_adapters
    with pytest.raises(ValueError, match="use_adapters"):
        apply_stage(stage1_model, stage2)


def test_internvl_pos_embedding_with_frozen_llm(tmp_path, toy_folder):
    trainable, changed, names, summary = run_two_steps("internvl-finetune", tmp_path, toy_folder)
    check_exact(trainable, changed)
    assert trainable == {n for n in names if n.startswith("model.multi_modal_projector.")} | {
        "model.vision_tower.embeddings.position_embedding"
    }
    lrs = {g["initial_lr"] for g in summary["trainer"].optimizer.param_groups}
    assert lrs == {1e-3, 1e-4}


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from transformers import TrainerCallback
    from internvl_chat.training.train import run
    recipe = json.loads(sys.argv[1])
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after checkpoint-4 was written, before step 5 is logged
                os.kill(os.getpid(), signal.SIGKILL)
    run(recipe, callbacks=[Kill()])
    """
)


def test_resume_after_kill_reproduces_the_loss_curve(projectors, tmp_path, toy_folder):
    from internvl_chat.training.train import run

    overrides = {
        "model.pretrain_mm_mlp_adapter": projectors["llava-align"][3],
        "training.max_steps": 8,
        "training.save_strategy": "steps",
        "training.save_steps": 2,
        "training.learning_rate": 1e-3,
        "training.gradient_checkpointing": "false",
        "training.group_by_modality_length": "true",
        "data.max_samples": 64,
    }
    full = run(tiny_recipe("llava-finetune", tmp_path / "full", toy_folder, **overrides))
    reference = [(e["step"], e["loss"]) for e in full["trainer"].state.log_history if "loss" in e]
    assert len(reference) == 8

    recipe = tiny_recipe("llava-finetune", tmp_path / "killed", toy_folder, **overrides)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(recipe)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    before_kill = json.loads((tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").read_text())

    resumed = run(recipe, resume=True)
    curve = [(e["step"], e["loss"]) for e in resumed["trainer"].state.log_history if "loss" in e]
    assert [s for s, _ in curve] == list(range(1, 9))
    assert [(e["step"], e["loss"]) for e in before_kill["log_history"] if "loss" in e] == curve[:4]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=0, atol=1e-6)


def test_compact_cpu_loss_equals_trl_fused_loss(projectors, tmp_path, toy_folder):
    """Our CPU shortcut (LM head on supervised positions only) gives TRL's loss, packed or not, and logs TRL's
    metrics (entropy, mean_token_accuracy, num_tokens) with TRL's values."""
    import datasets
    from trl import SFTTrainer

    from internvl_chat.data import VisionChatDataset
    from internvl_chat.training.train import run

    overrides = {"training.max_steps": 1, "model.pretrain_mm_mlp_adapter": projectors["llava-align"][3]}
    summary = run(tiny_recipe("llava-finetune", tmp_path, toy_folder, **overrides))
    trainer = summary["trainer"]
    collator = trainer.data_collator
    dataset = VisionChatDataset.from_file(Path(toy_folder) / "finetune.json", image_folder=Path(toy_folder) / "images")
    # TRL is given the torch dataset's HF view: the same items, images decoded by the dataset
    assert isinstance(trainer.train_dataset, datasets.Dataset) and len(trainer.train_dataset) == len(dataset)
    assert trainer.train_dataset[3]["id"] == dataset[3]["id"]
    assert trainer.train_dataset[3]["images"][0].size == dataset[3]["images"][0].size
    samples = [dataset[i] for i in range(6)]
    model = trainer.model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(collator(samples)))
        trl = SFTTrainer.compute_loss(trainer, model, dict(collator(samples)))
        collator.packing = True
        packed = trainer.compute_loss(model, dict(collator(samples)))
        collator.packing = False
    # float32 over a 32k vocabulary: TRL's chunked log-sum-exp and ours differ in summation order (~1e-5 relative)
    torch.testing.assert_close(ours, trl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed, ours, rtol=1e-4, atol=1e-4)

    # The logged metrics: each path alone between two `log` calls (train mode counts the tokens).
    model.train()
    batch = collator(samples)
    with torch.no_grad():  # some supervised labels := the greedy prediction, so accuracy is not trivially 0
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    rows, cols = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)
    top2 = logits[rows, cols].topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.02  # no near-tie that rounding in either head could flip
    rows, cols = rows[clear][::2], cols[clear][::2]
    assert len(rows) >= 2
    batch["labels"][rows, cols + 1] = logits[rows, cols].argmax(-1)
    logged = {}
    for name, compute in (
        ("ours", trainer.compute_loss),
        ("trl", lambda m, b: SFTTrainer.compute_loss(trainer, m, b)),
    ):
        tokens_before = trainer.compact_train_tokens
        with torch.no_grad():
            compute(model, dict(batch))
        trainer.log({"loss": 0.0})
        logged[name] = {k: v for k, v in trainer.state.log_history[-1].items() if k != "step"}
        if name == "ours":
            logged[name]["num_tokens"] -= tokens_before  # TRL's count starts at 0 (its path never ran before)
    assert set(logged["ours"]) >= {"entropy", "mean_token_accuracy", "num_tokens"}
    assert logged["ours"]["num_tokens"] == logged["trl"]["num_tokens"] == int(batch["attention_mask"].sum())
    for key in ("entropy", "mean_token_accuracy"):
        assert logged["ours"][key] == pytest.approx(logged["trl"][key], rel=1e-4, abs=1e-5), key
    assert 0 < logged["ours"]["mean_token_accuracy"] < 1 and logged["ours"]["entropy"] > 0


def test_packed_varlen_recipe_matches_padded_losses(projectors, tmp_path, toy_folder, monkeypatch):
    """`data.packing: true` + `model.attn_implementation: internvl_varlen` (padding-free rows, per-sample attention)
    trains the same: step losses equal the padded SDPA recipe's."""
    from internvl_chat.modeling import modeling_varlen_attention as varlen
    from internvl_chat.training.train import run

    calls = []  # the trainer must hand cu_seq_lens to the attention (on CPU: the per-sample reference runs)
    reference = varlen._reference_varlen
    monkeypatch.setattr(varlen, "_reference_varlen", lambda *a: calls.append(1) or reference(*a))

    base = {"training.max_steps": 2, "model.pretrain_mm_mlp_adapter": projectors["llava-align"][3]}
    curves = {}
    for name, extra in (
        ("padded", {}),
        ("varlen", {"data.packing": "true", "model.attn_implementation": "internvl_varlen"}),
    ):
        summary = run(tiny_recipe("llava-finetune", tmp_path / name, toy_folder, **base, **extra))
        assert summary["trainer"].model.config.text_config._attn_implementation == (
            "internvl_varlen" if extra else "sdpa"
        )
        curves[name] = [e["loss"] for e in summary["trainer"].state.log_history if "loss" in e]
    assert len(curves["padded"]) == 2
    assert len(calls) >= 2 * 2  # 2 steps × 2 tiny layers at least (recomputation under checkpointing adds more)
    torch.testing.assert_close(torch.tensor(curves["varlen"]), torch.tensor(curves["padded"]), rtol=1e-4, atol=1e-4)


def test_modality_grouped_sampler():
    from internvl_chat.training.trainer import ModalityLengthGroupedSampler

    lengths = [5 + i % 7 for i in range(40)] + [-(3 + i % 5) for i in range(24)]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(64))
    megabatches = [order[i : i + 8] for i in range(0, 64, 8)]
    mixed = [m for m in megabatches if len({lengths[i] > 0 for i in m}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is megabatches[-1])  # only the leftover batch mixes
    assert list(sampler) == order  # deterministic in (seed, epoch): resumes replay the order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_projector_artifact_roundtrip_and_llava_keys(tiny_model, tmp_path):
    from internvl_chat.training.trainer import load_projector, save_projector

    path = save_projector(tiny_model, tmp_path)
    other = type(tiny_model)(tiny_model.config)
    load_projector(other, path)
    for name, param in tiny_model.model.multi_modal_projector.named_parameters():
        assert torch.equal(param, dict(other.model.multi_modal_projector.named_parameters())[name])
    # LLaVA's original stage-1 file: model.mm_projector.0/.2 in a torch pickle
    original = {
        "model.mm_projector.0.weight": tiny_model.model.multi_modal_projector.linear_1.weight.detach() + 1,
        "model.mm_projector.0.bias": tiny_model.model.multi_modal_projector.linear_1.bias.detach(),
        "model.mm_projector.2.weight": tiny_model.model.multi_modal_projector.linear_2.weight.detach(),
        "model.mm_projector.2.bias": tiny_model.model.multi_modal_projector.linear_2.bias.detach(),
    }
    torch.save(original, tmp_path / "mm_projector.bin")
    load_projector(other, tmp_path / "mm_projector.bin")
    assert torch.equal(other.model.multi_modal_projector.linear_1.weight, original["model.mm_projector.0.weight"])
    with pytest.raises(ValueError, match="missing"):
        torch.save({"model.mm_projector.0.weight": original["model.mm_projector.0.weight"]}, tmp_path / "bad.bin")
        load_projector(other, tmp_path / "bad.bin")


def test_lora_target_rule(tiny_model):
    import re

    from internvl_chat.training.trainer import lora_target_modules

    pattern = re.compile(lora_target_modules(tiny_model))
    matched = {n for n, m in tiny_model.named_modules() if pattern.fullmatch(n)}
    expected = {
        n
        for n, m in tiny_model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
    }
    assert matched == expected and matched
    assert not any(pattern.fullmatch(n) for n in ("lm_head", "model.vision_tower.encoder.layers.0.self_attn.q_proj"))


def test_overrides():
    from internvl_chat.training.train import apply_overrides, load_recipe

    recipe = load_recipe(TINY / "llava-align.yaml")
    apply_overrides(recipe, ["--learning_rate", "2e-4", "--data.max_samples", "8", "--lora.r", "4", "--bf16", "false"])
    assert recipe["training"]["learning_rate"] == 2e-4 and recipe["training"]["bf16"] is False
    assert recipe["data"]["max_samples"] == 8 and recipe["lora"]["r"] == 4
    with pytest.raises(ValueError, match="unknown recipe key"):
        apply_overrides(recipe, ["--no_such_key", "1"])
    with pytest.raises(ValueError, match="unknown block"):
        apply_overrides(recipe, ["--nope.x", "1"])


def all_recipes():
    return sorted((ROOT / "recipes").glob("*.yaml")) + sorted(TINY.glob("*.yaml"))


@pytest.mark.parametrize("path", all_recipes(), ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses(path):
    """Every recipe: known keys in every block, valid stage/model/data/lora, a header with its exact command."""
    import dataclasses

    from internvl_chat.presets import PRESETS
    from internvl_chat.templates import resolve_template_name
    from internvl_chat.training.build import ModelConfig
    from internvl_chat.training.stages import StageConfig
    from internvl_chat.training.train import DEEPSPEED_CONFIGS, DataConfig, LoraSettings, load_recipe
    from internvl_chat.training.trainer import VisionSFTConfig

    text = path.read_text()
    rel = path.relative_to(ROOT).as_posix()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"internvl-chat train {rel}" in line for line in header), f"{rel}: no exact command in the header"
    recipe = load_recipe(path)
    StageConfig.from_dict(recipe["stage"])
    model = ModelConfig.from_dict(recipe["model"])
    assert model.preset is None or model.preset in PRESETS
    data = DataConfig.from_dict(recipe["data"])
    if data.template:
        resolve_template_name(data.template)
    LoraSettings.from_dict(recipe["lora"])
    fields = {f.name for f in dataclasses.fields(VisionSFTConfig)} | {"warmup_ratio"}
    unknown = set(recipe["training"]) - fields
    assert not unknown, f"{rel}: unknown training keys {unknown}"
    assert recipe["training"].get("output_dir")
    ds = recipe["training"].get("deepspeed")
    if ds:
        assert ds in DEEPSPEED_CONFIGS or (ROOT / ds).exists()
    if "tiny" not in rel:
        assert recipe["training"].get("bf16") is True and recipe["training"].get("tf32") is True
        assert not model.tiny


def test_shipped_distributed_configs(tiny_model):
    """Every `deepspeed: NAME` of a recipe resolves to a shipped config of that ZeRO stage whose batch / clipping /
    precision fields are "auto" (the trainer's arguments fill them; a fixed value would conflict with the recipe);
    the FSDP accelerate config parses and wraps classes that a LLaVA model really has."""
    from importlib import resources

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    from internvl_chat.training.train import DEEPSPEED_CONFIGS, _resolve_deepspeed

    assert set(DEEPSPEED_CONFIGS) == {"zero2", "zero3", "zero3_offload"}
    for name in DEEPSPEED_CONFIGS:
        training = {"deepspeed": name}
        _resolve_deepspeed(training)
        assert os.path.isfile(training["deepspeed"]), training
        ds = HfDeepSpeedConfig(training["deepspeed"])
        stage = int(name[len("zero")])
        assert ds.get_value("zero_optimization.stage") == stage, name
        assert ds.is_zero3() == (stage == 3) and ds.is_offload() == name.endswith("_offload"), name
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds.get_value(key) == "auto", (name, key)
        assert ds.get_value("bf16.enabled") == "auto" and ds.get_value("fp16.enabled") == "auto", name
        if stage == 3:  # the stage-end save gathers the full weights (save_stage_artifacts relies on it)
            assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
    fsdp = load_config_from_file(str(resources.files("internvl_chat.training").joinpath("configs", "fsdp.yaml")))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    wrapped = set(fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped <= {type(m).__name__ for m in tiny_model.modules()}, wrapped  # LLaVA-1.5: Llama + CLIP


def test_compile_layers_trains_the_same_set(tmp_path, toy_folder):
    """`compile_layers: true` wraps every LLM decoder layer in torch.compile and training still updates exactly the
    stage's trainable set (stage 1: the projector)."""
    trainable, changed, _, summary = run_two_steps(
        "llava-align", tmp_path, toy_folder, **{"training.compile_layers": "true"}
    )
    layers = summary["trainer"].model.get_decoder().layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    check_exact(trainable, changed)
