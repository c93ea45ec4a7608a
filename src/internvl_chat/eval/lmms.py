"""The lmms-eval model adapter `internvl_chat`: any of our checkpoints (and converted originals) under lmms-eval.

    internvl-chat lmms-eval --model internvl_chat --model_args pretrained=DIR --tasks textvqa_val --batch_size 16
    python -m internvl_chat.eval.lmms_cli --model internvl_chat --model_args pretrained=DIR --tasks ...  # the same
    lmms-eval --model internvl_chat ...      # lmms-eval's own CLI (the package registers the entry point)

Needs the ``lmms`` extra (``pip install 'internvl-chat[lmms]'``). Registered under ``internvl_chat`` in lmms-eval's
model registry (its ``lmms_eval.models`` entry point and `internvl_chat.eval.lmms_cli.register`).

What it runs is what ``internvl-chat eval`` runs: the model loads through `internvl_chat.loading.load_model` (fp16
on CUDA, as LLaVA's evaluation; ``dtype=`` overrides), every prompt goes through the model's own chat template
(`internvl_chat.eval.runner.build_prompt`: the image first, then lmms-eval's question text; LLaVA's piecewise
tokenization) and generation is the runner's batched, length-sorted, greedy ``generate_predictions`` (so batch 1 and
batch N give the same answers). lmms-eval's ``until`` strings then cut each answer, as its other adapters do.

``--model_args`` keys: ``pretrained`` (model folder), ``model_base`` (base folder when ``pretrained`` is an unmerged
LoRA adapter), ``dtype`` (auto|float32|bfloat16|float16), ``device``, ``device_map``, ``load_4bit``, ``load_8bit``,
``attn_implementation``, ``trust_remote_code``, ``template`` (a registered template name instead of the model's),
``system_prompt``, ``max_new_tokens`` (when a task sets none; default 1024 as lmms-eval's LLaVA adapters),
``fast_decode`` (`FastGreedyDecoder`), ``num_workers`` (image-preprocessing threads). ``--batch_size N`` is the
generation batch. Under ``accelerate launch`` each process evaluates lmms-eval's share on its own GPU.

Request types:

* ``generate_until``: greedy only; a task asking for sampling (``do_sample`` / ``temperature > 0``) or beams gets
  greedy decoding and a warning (the published LLaVA-family protocols are greedy). A request with one image and no
  ``<image>`` in its text takes the runner's path; several images, or ``<image>`` placeholders written by the task,
  are placed where the text puts them (all at the front when it puts none) and batched with one processor call.
* ``loglikelihood`` (lmms-eval's ``multiple_choice`` tasks): the continuation is the assistant answer of the
  conversation, scored on the tokens training supervises for it (answer and terminator, ``</s>``, ``<|end|>``...;
  lmms-eval's LLaVA adapter also scores the terminator). Returns
  (mean negative log-likelihood per continuation token, whether greedy decoding gives exactly those tokens):
  lmms-eval ranks choices by the smallest value (``argmin``), so this is a loss, not a log-probability.
* ``generate_until_multi_round``: each round's prompt comes from the task's ``doc_to_text``; the documents still
  talking are batched together round by round.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from ..data.formats import IMAGE_EXTENSIONS
from ..data.images import load_image
from ..data.sharding import Ranks
from ..modeling import IMAGE_TOKEN
from .runner import generate_predictions
from .tasks import Sample

logger = logging.getLogger(__name__)

MODEL_NAME = "internvl_chat"
DEFAULT_MAX_NEW_TOKENS = 1024
# A multi-round task whose doc_to_text never signals the end would loop forever.
MAX_ROUNDS = 100


def _images(visuals, task: str) -> list:
    """lmms-eval's ``doc_to_visual`` output as a flat list of PIL images (None / [] for text-only documents)."""
    out = []
    stack = [visuals] if visuals is not None else []
    while stack:
        item = stack.pop(0)
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            stack[:0] = list(item)
        elif isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, (str, Path)) and Path(item).suffix.lower() in IMAGE_EXTENSIONS:
            # a path visual is an image when it ends like one (a video path is refused below)
            out.append(load_image(str(item)))
        else:
            raise ValueError(
                f"internvl_chat: task {task!r} gives a {type(item).__name__} visual ({str(item)[:80]!r}); "
                "the model takes images only (no video or audio)."
            )
    return out


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of lmms-eval's stop strings."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _until(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"internvl_chat: generation_kwargs 'until' must be a string or a list, got {until!r}.")
    return [str(u) for u in until]


@register_model(MODEL_NAME)
class InternVLChat(lmms):
    """lmms-eval's ``lmms`` interface over our model + processor (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        load_4bit: bool = False,
        load_8bit: bool = False,
        template: str | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        fast_decode: bool = False,
        num_workers: int = 4,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"internvl_chat: unknown --model_args {', '.join(sorted(unknown))} (known: pretrained, model_base, "
                "dtype, device, device_map, load_4bit, load_8bit, attn_implementation, trust_remote_code, template, "
                "system_prompt, max_new_tokens, fast_decode, num_workers)."
            )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"internvl_chat: --batch_size must be a number, got {batch_size!r}.") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"internvl_chat: --batch_size must be >= 1, got {batch_size!r}.")
        from accelerate import Accelerator

        from ..loading import load_model

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            # lmms-eval deals the requests over the processes; each one holds a whole model on its own device.
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        self._model, self.processor = load_model(
            str(pretrained),
            model_base=model_base,
            dtype=str(dtype),
            device=device,
            device_map=device_map,
            load_4bit=bool(load_4bit),
            load_8bit=bool(load_8bit),
            attn_implementation=attn_implementation,
            trust_remote_code=bool(trust_remote_code),
            cuda_auto_dtype="float16",
        )
        self.pretrained = str(pretrained)
        self.template = template
        self.system_prompt = system_prompt or None
        self.max_new_tokens = int(max_new_tokens)
        self.fast_decode = bool(fast_decode)
        self.num_workers = int(num_workers)
        self._warned: set[str] = set()

    # lmms-eval reads these.
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def eot_token_id(self):
        return self.processor.tokenizer.eos_token_id

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _max_new_tokens(self, gen_kwargs: dict, task: str) -> int:
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            self._warn_once(f"sample:{task}", f"internvl_chat: task {task!r} asks for sampling; decoding greedily.")
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            self._warn_once(f"beams:{task}", f"internvl_chat: task {task!r} asks for beam search; decoding greedily.")
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)

    # ---- generation -------------------------------------------------------------------------------------------

    def _messages(self, context: str, n_images: int) -> list[dict]:
        """The user turn of a request with several images or task-written ``<image>`` placeholders: the images
        where the text puts them, or all at the front when it puts none (as lmms-eval's LLaVA adapters do)."""
        pieces = context.split(IMAGE_TOKEN)
        if len(pieces) == 1:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        elif len(pieces) - 1 == n_images:
            content = []
            for i, piece in enumerate(pieces):
                if i:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece})
        else:
            raise ValueError(
                f"internvl_chat: the prompt holds {len(pieces) - 1} {IMAGE_TOKEN} placeholders but the document has "
                f"{n_images} images."
            )
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": content}]

    def _prompt(self, messages: list[dict]) -> str:
        if self.template is not None:
            from ..templates import render_chat

            return render_chat(messages, self.template, add_generation_prompt=True)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _generate(self, items: list[tuple[str, list]], max_new_tokens: int, desc: str) -> list[str]:
        """Answers of (context, images) pairs, in order: the runner's batched, length-sorted greedy generation."""
        simple, other = [], []
        for i, (context, images) in enumerate(items):
            if len(images) <= 1 and IMAGE_TOKEN not in context:
                simple.append(Sample(id=i, prompt=context, image=images[0] if images else None))
            elif len(images) == 1 and context.lstrip().startswith(IMAGE_TOKEN) and context.count(IMAGE_TOKEN) == 1:
                # LLaVA-style "<image>\nquestion" written by the task: the template puts the image there anyway.
                text = context.lstrip()[len(IMAGE_TOKEN) :].lstrip("\n ")
                simple.append(Sample(id=i, prompt=text, image=images[0]))
            else:
                other.append(i)
        answers: dict[int, str] = {}
        if simple:
            with tempfile.TemporaryDirectory(prefix="internvl-lmms-") as tmp:
                texts, _ = generate_predictions(
                    self._model,
                    self.processor,
                    simple,
                    Path(tmp) / "predictions.jsonl",
                    batch_size=self.batch_size_per_gpu,
                    max_new_tokens=max_new_tokens,
                    num_workers=self.num_workers,
                    template=self.template,
                    system=self.system_prompt,
                    model_id=self.pretrained,
                    desc=desc,
                    fast_decode=self.fast_decode,
                    # lmms-eval already gave this process its share: no second split over the launch.
                    ranks=Ranks(),
                )
            answers.update((s.id, texts[s.key]) for s in simple)
        if other:
            answers.update(self._generate_interleaved([(i, *items[i]) for i in other], max_new_tokens))
        return [answers[i] for i in range(len(items))]

    def _generate_interleaved(self, items: list[tuple[int, str, list]], max_new_tokens: int) -> dict[int, str]:
        """Requests with several images or placeholders in the text: one processor call per batch, longest first."""
        prompts = {i: self._prompt(self._messages(context, len(images))) for i, context, images in items}
        images = {i: imgs for i, _, imgs in items}
        lengths = {i: len(self.processor.tokenizer(prompts[i])["input_ids"]) for i in prompts}
        order = sorted(prompts, key=lambda i: -(lengths[i] + len(images[i]) * self.processor.image_seq_length))
        pad_id = self.processor.tokenizer.pad_token_id
        out = {}
        for start in range(0, len(order), self.batch_size_per_gpu):
            batch = order[start : start + self.batch_size_per_gpu]
            inputs = self.processor(
                # The image processor applies the model's RGB / alpha rule.
                images=[list(images[i]) for i in batch],
                text=[prompts[i] for i in batch],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
            with torch.inference_mode():
                new = self._model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_id,
                )[:, inputs["input_ids"].shape[1] :]
            out.update(zip(batch, self.processor.post_process_image_text_to_text(new)))
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Requests with the same generation settings are answered together (one length-sorted batching).
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            gen_kwargs = req.args[1] or {}
            key = json.dumps({k: v for k, v in gen_kwargs.items()}, sort_keys=True, default=str)
            groups.setdefault(f"{req.args[4]}\0{key}", []).append(n)
        results: list[str | None] = [None] * len(requests)
        for members in groups.values():
            _, gen_kwargs, _, _, task, _ = requests[members[0]].args
            gen_kwargs = dict(gen_kwargs or {})
            until = _until(gen_kwargs)
            items = []
            for n in members:
                context, _, doc_to_visual, doc_id, task, split = requests[n].args
                items.append((context, _images(doc_to_visual(self.task_dict[task][split][doc_id]), task)))
            texts = self._generate(items, self._max_new_tokens(gen_kwargs, task), desc=str(task))
            for n, (context, _), text in zip(members, items, texts):
                results[n] = _cut(text, until)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), results[n])
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list:
        """Round by round: round 0 is the request's context; later rounds come from the task's ``doc_to_text(doc,
        previous_output=..., round_idx=..., previous_round_info=...)`` until it signals the end; a document's result
        is the round results that call returns (the form lmms-eval's multi-round tasks score)."""
        results: list = [None] * len(requests)
        state = {}
        for n, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            state[n] = dict(doc=doc, doc_to_text=doc_to_text, context=context, task=task, gen=dict(gen_kwargs or {}))
            state[n].update(images=_images(doc_to_visual(doc), task), outputs=[], info=None)
        active, round_idx = list(state), 0
        while active:
            by_settings: dict[str, list[int]] = {}
            for n in active:
                key = json.dumps(state[n]["gen"], sort_keys=True, default=str)
                by_settings.setdefault(key, []).append(n)
            for members in by_settings.values():
                gen = state[members[0]]["gen"]
                task = state[members[0]]["task"]
                items = [(state[n]["context"], state[n]["images"]) for n in members]
                texts = self._generate(items, self._max_new_tokens(gen, task), desc=f"{task} round {round_idx}")
                for n, text in zip(members, texts):
                    state[n]["outputs"].append(_cut(text, _until(gen)).strip())
            round_idx += 1
            if round_idx > MAX_ROUNDS:
                raise ValueError(f"internvl_chat: a multi-round task ran {MAX_ROUNDS} rounds without ending.")
            still = []
            for n in active:
                s = state[n]
                visuals, context, terminal, round_res, info = s["doc_to_text"](
                    s["doc"], previous_output=list(s["outputs"]), round_idx=round_idx, previous_round_info=s["info"]
                )
                if terminal:
                    results[n] = round_res
                else:
                    s.update(context=context, info=info)
                    if visuals is not None:
                        s["images"] = _images(visuals, s["task"])
                    still.append(n)
            active = still
        return results

    # ---- likelihood -------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            if len(req.args) == 2:
                # lmms-eval's unconditional choice requests (acc_mutual_info): no context, no image.
                (context, continuation), images = req.args, []
            else:
                context, continuation, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                if not isinstance(continuation, str):
                    continuation = continuation(doc)
                images = _images(doc_to_visual(doc), task) if doc_to_visual is not None else []
            out.append(self._score(context, str(continuation), images))
        return out

    def _score(self, context: str, continuation: str, images: list) -> tuple[float, bool]:
        """(mean NLL of the continuation's tokens, whether they are the greedy tokens): the tokens training would
        supervise for this answer (`templates.encode_chat`'s mask: the separator after ``ASSISTANT:``, the answer
        and its terminator), in the conversation tokenized as the processor does."""
        from ..templates import encode_chat

        messages = self._messages(context, len(images))
        full_messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": continuation}]}]
        processor = self.processor
        encoded = encode_chat(
            processor.tokenizer,
            full_messages,
            self.template or processor.chat_template,
            image_token=processor.image_token,
            image_seq_length=processor.image_seq_length,
            image_token_id=processor.image_token_id,
        )
        positions = [i for i, m in enumerate(encoded["assistant_masks"]) if m]
        if not positions or positions[0] == 0:
            raise ValueError(f"internvl_chat: cannot score continuation {continuation!r}: it has no answer tokens.")
        input_ids = torch.tensor([encoded["input_ids"]], device=self.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
            inputs["pixel_values"] = pixels.to(self.device, self._model.dtype)
        with torch.inference_mode():
            logits = self._model(**inputs).logits[0].float()  # (T, vocab)
        where = torch.tensor(positions, device=self.device)
        targets = input_ids[0, where]
        predicted = logits[where - 1]  # the logits at t predict token t + 1
        logprobs = torch.log_softmax(predicted, dim=-1).gather(-1, targets[:, None])[:, 0]
        greedy = bool((predicted.argmax(-1) == targets).all())
        return float(-logprobs.mean()), greedy
