"""Judge-model scoring (MM-Vet, LLaVA-Bench-in-the-Wild, MMBench answer extraction) through any OpenAI-compatible
chat endpoint, with the `openai` SDK's retries and an on-disk cache of judgements.

    export INTERNVL_JUDGE_BASE_URL=https://api.openai.com/v1      # or OPENAI_BASE_URL; our `internvl-chat serve`
    export INTERNVL_JUDGE_MODEL=gpt-4-0613                        # optional: overrides each grader's default
    export INTERNVL_JUDGE_API_KEY=sk-...                          # or OPENAI_API_KEY; optional for local servers
    internvl-chat eval --model DIR --task mmvet --data llava-mm-vet.jsonl --image-folder images

    client = JudgeClient("http://127.0.0.1:8000/v1", "gpt-4-0613", cache_path="judge_cache.jsonl")
    client.chat([{"role": "user", "content": "..."}], temperature=0.0, max_tokens=3)

The prompts and rules are the originals': MM-Vet's few-shot grading table (``mm-vet_evaluator.py``: judge
``gpt-4-0613``, max_tokens 3, re-ask with "Predict the correctness of the answer (digit): " at temperature 0.0, 0.5,
... 2.0, and 0.0 after five re-asks) and LLaVA's ``eval_gpt_review_bench.py`` with the ``llava_bench_*`` rules of
``table/rule.json`` (judge ``gpt-4-0314``, temperature 0.2, reference = GPT-4's answer as Assistant 1, the model as
Assistant 2, [-1, -1] for a review without two scores on its first line). Transport failures (connection errors,
timeouts, 408 / 409 / 429 / 5xx) are retried by the SDK with exponential backoff, honouring ``Retry-After``; other
4xx answers fail at once. The cache key is a hash of (model, messages, temperature, max_tokens), so reruns cost
nothing, an interrupted run resumes where it stopped, and a changed prompt is judged again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import metrics

logger = logging.getLogger(__name__)

# The judge each official grader uses (recorded in the scores; INTERNVL_JUDGE_MODEL overrides).
DEFAULT_JUDGES = {"mmvet": "gpt-4-0613", "llava_bench": "gpt-4-0314", "mmbench": "gpt-3.5-turbo-0125"}
MMVET_MAX_TRIES = 5  # the evaluator gives 0.0 once its try counter passes 5 (five re-asks after the first answer)

MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
# rule.json holds the same text for llava_bench_conv, llava_bench_detail and llava_bench_complex (role "Assistant").
LLAVA_BENCH_RULES = {c: {"role": "Assistant", "prompt": LLAVA_BENCH_RULE} for c in ("conv", "detail", "complex")}

MMBENCH_EXTRACT_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\nExample 2: \nQuestion: What is the main object in image?\n"
    "Options: A. teddy bear B. rabbit C. cat D. dog\nAnswer: Spider\nYour output: Z\nExample 3: \n"
    "Question: {}?\nOptions: {}\nAnswer: {}\nYour output: "
)
# VLMEvalKit's Chinese template, used when the question holds CJK characters.
MMBENCH_EXTRACT_PROMPT_CN = (
    "你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。"
    "你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。"
    "如果所有选项的意义都与答案显著不同，则输出 Z。"
    "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。"
    "例 1:"
    "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n"
    "例 2: \n"
    "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n"
    "例 3: \n"
    "问题: {}?\n选项: {}\n答案: {}\n输出: "
)


class JudgeError(RuntimeError):
    """The judge endpoint kept failing (after retries) or refused the request."""


class JudgeClient:
    """OpenAI-compatible chat client (the `openai` SDK: ``max_retries`` retries with backoff, ``timeout`` per
    request) with a JSONL cache of every answer and a count of the HTTP requests actually sent."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        cache_path: str | os.PathLike | None = None,
        max_retries: int = 6,
        timeout: float = 120.0,
        concurrency: int = 4,
    ):
        import openai

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self.calls = 0  # HTTP requests sent (cache misses and their retries), for tests and logs
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._count]})
        # Local servers need no key, but the SDK insists on one.
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or "no-key",
            max_retries=max_retries,
            timeout=timeout,
            http_client=http,
        )
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, dict] = {}
        if self.cache_path and self.cache_path.exists():
            with open(self.cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    self.cache[rec["key"]] = rec

    def _count(self, request) -> None:
        with self._lock:
            self.calls += 1

    @classmethod
    def from_env(
        cls, cache_path: str | os.PathLike | None = None, default_model: str = "gpt-4-0613", **kwargs
    ) -> JudgeClient | None:
        """``INTERNVL_JUDGE_BASE_URL`` (or ``OPENAI_BASE_URL``), ``INTERNVL_JUDGE_MODEL`` (default: the grader's own
        judge, ``default_model``), ``INTERNVL_JUDGE_API_KEY`` (or ``OPENAI_API_KEY``); ``None`` without a base URL."""
        base_url = os.environ.get("INTERNVL_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            return None
        model = os.environ.get("INTERNVL_JUDGE_MODEL") or default_model
        key = os.environ.get("INTERNVL_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return cls(base_url, model, key, cache_path=cache_path, **kwargs)

    def _key(self, payload: dict) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        """The judge's answer (from the cache when this exact request was answered before)."""
        return self.complete(messages, temperature, max_tokens)[0]

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> tuple[str, str]:
        """(answer, model name the endpoint reported) of one request, cached."""
        payload = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        key = self._key(payload)
        with self._lock:
            if key in self.cache:
                rec = self.cache[key]
                return rec["content"], rec.get("response_model") or self.model
        content, response_model = self._post(payload)
        rec = {"key": key, "model": self.model, "response_model": response_model, "content": content}
        with self._lock:
            self.cache[key] = rec
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return content, response_model

    def _post(self, payload: dict) -> tuple[str, str]:
        import openai

        try:
            response = self._client.chat.completions.create(**payload)
        except openai.APIStatusError as err:
            retried = err.status_code in (408, 409, 429) or err.status_code >= 500
            detail = f"HTTP {err.status_code}: {str(err.message)[:200]}"
            if not retried:
                raise JudgeError(f"judge at {self.base_url} refused the request ({detail})") from err
            raise JudgeError(
                f"judge at {self.base_url} failed after {self.max_retries + 1} attempts ({detail})"
            ) from err
        except openai.APIError as err:  # connection errors and timeouts (after the retries), unreadable bodies
            raise JudgeError(
                f"judge at {self.base_url} failed after {self.max_retries + 1} attempts ({err!r})"
            ) from err
        try:
            content = response.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError) as err:
            raise JudgeError(f"judge at {self.base_url} sent an answer without choices: {response!r:.200}") from err
        return content, getattr(response, "model", None) or self.model

    def map(self, fn, items):
        """``fn`` over ``items`` with up to ``concurrency`` requests in flight; results in input order."""
        if self.concurrency <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))


class JudgeItemError(JudgeError):
    """A judge failure on one benchmark item (the message names it and says how to resume)."""


def _item_error(client: JudgeClient, task: str, item: str, err: JudgeError) -> JudgeItemError:
    where = f" in {client.cache_path}" if client.cache_path else ""
    return JudgeItemError(
        f"{task}: the judge failed on item {item} ({err}); judgements already made are cached{where}, "
        "so rerunning the same command resumes from there"
    )


def mmvet_query(question: str, answer: str, prediction: str) -> str:
    """The MM-Vet grading prompt of one sample (the ground truth's <AND>/<OR> padded with spaces, as the original)."""
    gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_PROMPT + "\n" + " | ".join([question, gt, prediction, ""])


def judge_mmvet_one(client: JudgeClient, question: str, answer: str, prediction: str) -> dict:
    """MM-Vet's grading loop of one sample: parse the first token; on failure re-ask with the digit suffix at
    temperature 0.0, 0.5, 1.0, 1.5, 2.0; after the fifth re-ask the score is 0.0 (that last answer is not read).

    Returns ``score``, ``content`` (as the evaluator's grade file keeps it: the parsed token, or the last raw
    answer after a fallback), ``model`` (the endpoint's model name), ``tries`` (requests made) and ``fallback``.
    """
    query = mmvet_query(question, answer, prediction)
    content, model = client.complete([{"role": "user", "content": query}], temperature=0.0, max_tokens=3)
    tries, temperature = 1, 0.0
    while True:
        score = metrics.mmvet_parse_score(content)
        if score is not None:
            token = content.split(" ")[0].strip()
            return {"score": score, "content": token, "model": model, "tries": tries, "fallback": False}
        content, model = client.complete(
            [{"role": "user", "content": query + MMVET_RETRY_SUFFIX}], temperature=temperature, max_tokens=3
        )
        tries += 1
        temperature += 0.5
        if tries > MMVET_MAX_TRIES:
            return {"score": 0.0, "content": content, "model": model, "tries": tries, "fallback": True}


def judge_mmvet(client: JudgeClient, pairs) -> list[dict]:
    """Grades (sample, prediction) pairs of the mmvet task → records with id, mmvet_id, capability and the fields
    of `judge_mmvet_one`; a judge that keeps failing raises `JudgeItemError` naming the item."""

    def one(pair):
        sample, prediction = pair
        try:
            graded = judge_mmvet_one(client, sample.target["question"], sample.target["answer"], prediction)
        except JudgeError as err:
            raise _item_error(client, "mmvet", sample.meta.get("mmvet_id", sample.key), err) from err
        if graded["fallback"]:
            logger.warning(
                "mmvet %s: no score after %d tries; counted 0.0", sample.meta.get("mmvet_id"), graded["tries"]
            )
        return {
            "id": sample.key,
            "mmvet_id": sample.meta.get("mmvet_id", sample.key),
            "capability": sample.target["capability"],
            **graded,
        }

    return client.map(one, list(pairs))


def llava_bench_content(caption: str | list, question: str, reference: str, answer: str, category: str) -> str:
    """LLaVA's eval_gpt_review_bench user message (reference answer = Assistant 1, model = Assistant 2)."""
    rule = LLAVA_BENCH_RULES.get(category)
    if rule is None:
        raise ValueError(f"Visual QA category not found in rule file: llava_bench_{category}.")
    cap = "\n".join(caption) if isinstance(caption, list) else str(caption)
    role = rule["role"]
    return (
        f"[Context]\n{cap}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )


def judge_llava_bench(client: JudgeClient, pairs) -> list[dict]:
    """Reviews (sample, prediction) pairs of llava_bench → records with id, category, ``tuple`` [reference, model]
    and the review ``content``; a judge that keeps failing raises `JudgeItemError` naming the item."""

    def one(pair):
        sample, prediction = pair
        t = sample.target
        content = llava_bench_content(t["caption"], t["question"], t["reference"], prediction, sample.meta["category"])
        messages = [{"role": "system", "content": LLAVA_BENCH_SYSTEM}, {"role": "user", "content": content}]
        try:
            review = client.chat(messages, temperature=0.2, max_tokens=1024)
        except JudgeError as err:
            raise _item_error(client, "llava_bench", f"question_id {sample.id}", err) from err
        scores = metrics.llava_bench_parse_score(review)
        if scores == [-1.0, -1.0]:
            logger.warning(
                "llava_bench question %s: no two scores on the review's first line; counted [-1, -1]", sample.id
            )
        return {"id": sample.key, "category": sample.meta["category"], "tuple": scores, "content": review}

    return client.map(one, list(pairs))


def mcq_extract_prompt(question: str, choices: dict, answer: str) -> str:
    """VLMEvalKit's matching prompt: the question as given (the template adds "?"), the options as its
    ``build_option_str`` lists them, the Chinese template for questions with CJK characters."""
    options = "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in choices.items())
    template = MMBENCH_EXTRACT_PROMPT_CN if re.search("[\u4e00-\u9fff]", question) else MMBENCH_EXTRACT_PROMPT
    return template.format(question, options, answer)


def judge_mcq_letter(client: JudgeClient, question: str, choices: dict, answer: str) -> str | None:
    """MMBench's judge fallback (VLMEvalKit): ask which option the answer means and read the reply with the same
    rules. VLMEvalKit asks up to three times and then picks a random option; with a deterministic, cached judge a
    second identical request gives the same reply, so one request is made and an unreadable reply counts wrong."""
    reply = client.chat([{"role": "user", "content": mcq_extract_prompt(question, choices, answer)}], temperature=0.0)
    letter = metrics.mcq_extract(reply, choices)
    return letter if letter in choices else None
