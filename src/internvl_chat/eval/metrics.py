"""Scorers of every benchmark, as pure functions that reproduce the official scripts, quirks included.

    from internvl_chat.eval.metrics import normalize_vqa_answer, vqa_accuracy, anls, relaxed_accuracy, pope_metrics
    vqa_accuracy("Two", ["2"] * 10)                    # 1.0  (number words, articles, punctuation normalised)
    anls("the cat", ["The Cat"])                       # 1.0
    relaxed_accuracy("10.4", "10")                     # 1.0  (within 5 % of the target)
    pope_metrics(["Yes, there is.", "No"], ["yes", "yes"])["f1"]

Sources (read for the rules, re-implemented here):

* VQA normalisation / accuracy: LLaVA's ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor`` +
  ``TextVQAAccuracyEvaluator``), used by LLaVA for TextVQA and for the VQAv2 / VizWiz submission files.
* POPE: LLaVA's ``eval_pope.py``. GQA: ``scripts/convert_gqa_for_eval.py`` + GQA's ``eval.py`` (exact match;
  binary / open by structural type).
* ScienceQA: LLaVA-1.5's ``eval_science_qa.py``. SEED: ``scripts/convert_seed_for_submission.py``.
* MME: the MME ``eval_tool/calculation.py``. MMBench: VLMEvalKit / MMBench ``can_infer`` + circular grouping;
  LLaVA's ``eval_mmbench.py`` parser as the alternative.
* ANLS: the DocVQA / RRC evaluation script. ChartQA: pix2struct's ``relaxed_correctness``.
* OCRBench, FUNSD, SROIE: the MultimodalOCR / OCRBench ``eval`` script (case-insensitive containment); FUNSD /
  SROIE also LayTextLLM's ``evalFscore`` (key-value micro-F1, the LLaVAR-2 / LayTextLLM convention).
* MM-Vet / LLaVA-Bench judge outputs and tables: the MM-Vet evaluator (``mm-vet_evaluator.py``) and LLaVA's
  ``eval_gpt_review_bench.py`` + ``summarize_gpt_review.py``.

Where implementations disagree, the default follows the script that produced the published number and the other
is a keyword option (see each function's docstring and ``DISAGREEMENTS``).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "DISAGREEMENTS",
    "anls",
    "chartqa_score",
    "contains_match",
    "gqa_accuracy",
    "gqa_scores",
    "kv_field",
    "kv_fscore",
    "gqa_normalize",
    "levenshtein",
    "llava_bench_parse_score",
    "llava_bench_scores",
    "mcq_extract",
    "mmbench_circular",
    "mmbench_extract",
    "mmbench_rotations",
    "mme_parse",
    "mme_scores",
    "mmvet_parse_score",
    "mmvet_scores",
    "normalize_vqa_answer",
    "ocrbench_match",
    "ocrbench_scores",
    "pope_metrics",
    "pope_parse",
    "qbench_correct",
    "relaxed_accuracy",
    "scienceqa_correct",
    "scienceqa_parse",
    "seed_correct",
    "vqa_accuracy",
]

# Where two official implementations of a metric differ; the first option is our default.
DISAGREEMENTS = {
    "vqa_accuracy": (
        "protocol='m4c' (default; LLaVA's TextVQA evaluator and EvalAI answer processor: lower-case, normalise the "
        "prediction and every human answer) vs protocol='vqa_eval' (the VQA challenge's vqaEval.py run by the "
        "VQAv2 / VizWiz servers: answers normalised only when the 10 human answers disagree; ground truth only "
        "punctuation-processed, not article/number-processed)."
    ),
    "relaxed_accuracy": (
        "variant='pix2struct' (default; '50%' is read as 0.5) vs variant='internvl' (InternVL's copy: '50%' read "
        "as 50, and 4-character targets starting with '20' (years) compared as strings)."
    ),
    "scienceqa": (
        "unparsable answers count wrong (LLaVA-1.5 script, default) vs failed='random' (LLaVA-1.0 script picked a "
        "random option, seeded here)."
    ),
    "mmbench_extract": (
        "method='vlmevalkit' (default; current VLMEvalKit can_infer: option letter among the last tokens or "
        "'answer is X', then option text; option verbose=true adds its VERBOSE-mode article guard) vs "
        "method='llava' (LLaVA's eval_mmbench auto_parse_answer); both fall back to a judge model only when one "
        "is configured, otherwise the answer counts wrong."
    ),
    "mme_pairs": (
        "MME's calculation.py pairs consecutive lines of each subtask file; we group by (subtask, image), which is "
        "the same for the released files (two questions per image in order)."
    ),
    "ocr_vqa_family": (
        "ST-VQA / DocVQA / InfoVQA default to ANLS (their official metric); metric='contains' gives the "
        "MultimodalOCR containment accuracy that LLaVAR-style OCR tables use; FUNSD / SROIE default to it, and "
        "metric='fscore' gives LayTextLLM's key-value micro-F1 (evalFscore)."
    ),
}

# ----------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (EvalAI / m4c)
# ----------------------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
# [IMPORTANT] the official pattern is "(?!<=\d)(\.)(?!\d)": "(?!<=" is a negative *lookahead* for the text "<=",
# not the intended lookbehind, so every "." not followed by a digit is dropped ("2.5" stays, "3." -> "3").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATIONS:
        # [IMPORTANT] the official test looks at the *input* text (not the progressively edited one): a mark next
        # to a space, or any digit-comma-digit in the answer, deletes the mark; otherwise it becomes a space.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # [IMPORTANT] the official call is `sub("", out, re.UNICODE)`: re.UNICODE (== 32) lands in `count`, so at most
    # 32 periods are removed. Reproduced on purpose.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """LLaVA's ``EvalAIAnswerProcessor``: lower-case, drop ',' and '?', split "'s", strip punctuation (with the
    official quirks), map number words zero..ten (and "none") to digits, drop articles, restore contractions.

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _vqa_eval_normalize(text: str) -> str:
    """The VQA challenge's vqaEval.py processing of a prediction (no lower-casing before punctuation)."""
    return _process_digit_article(_process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: list[str], protocol: str = "m4c") -> float:
    """VQA soft accuracy: mean over the leave-one-out subsets of the human answers of min(#matches / 3, 1).

    ``protocol="m4c"`` (default, LLaVA's TextVQA evaluator): the prediction and every human answer go through
    :func:`normalize_vqa_answer`. ``protocol="vqa_eval"`` (the VQAv2 / VizWiz servers' vqaEval.py): answers are
    only whitespace-cleaned unless the human answers disagree, in which case the human answers get punctuation
    processing and the prediction punctuation + number/article processing. With 10 answers this is the official
    10-choose-9 average; other counts are averaged the same way (the m4c script asserts 10).
    """
    if not answers:
        return 0.0
    if protocol == "m4c":
        gts = [normalize_vqa_answer(a) for a in answers]
        pred = normalize_vqa_answer(prediction)
    elif protocol == "vqa_eval":
        gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        pred = prediction.replace("\n", " ").replace("\t", " ").strip()
        if len(set(gts)) > 1:
            gts = [_process_punctuation(a) for a in gts]
            pred = _vqa_eval_normalize(pred)
    else:
        raise ValueError(f"protocol must be 'm4c' or 'vqa_eval', got {protocol!r}")
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA, ST-VQA) and ChartQA relaxed accuracy
# ----------------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for i, cb in enumerate(b):
        current = [i + 1]
        for j, ca in enumerate(a):
            current.append(previous[j] if ca == cb else 1 + min(previous[j], previous[j + 1], current[-1]))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (official DocVQA script).

    Both strings are stripped, lower-cased and whitespace-collapsed for the distance, but the normaliser is the
    length of the *raw* strings (``max(len(answer.upper()), len(prediction.upper()))``, a quirk kept). The score
    is ``1 - min normalised distance`` over the answers, set to 0 when below ``threshold`` (a similarity of
    exactly 0.5 is kept).
    """
    if not answers:
        return 0.0
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


def _to_float(text: str, percent_divide: bool) -> float | None:
    try:
        if text.endswith("%"):
            value = float(text.rstrip("%"))
            return value / 100.0 if percent_divide else value
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05, variant: str = "pix2struct") -> float:
    """ChartQA relaxed accuracy: numbers within ``tolerance`` relative to the target, else exact string match.

    pix2struct's rule: both sides parsed as floats ('%' suffix allowed); when the prediction parses and the target
    parses to a non-zero number, ``|p - t| / |t| <= tolerance``; otherwise (non-numbers, or a zero target)
    case-insensitive string equality. ``variant="pix2struct"`` reads "50%" as 0.5 (so "50%" vs "50" is wrong);
    ``variant="internvl"`` reads it as 50 and compares 4-character targets starting with "20" (years) as strings.
    Both strings are stripped first (generation output is stripped anyway).
    """
    prediction, target = prediction.strip(), target.strip()
    if variant not in ("pix2struct", "internvl"):
        raise ValueError(f"variant must be 'pix2struct' or 'internvl', got {variant!r}")
    if variant == "internvl" and len(target) == 4 and target.startswith("20"):
        return float(prediction.lower() == target.lower())
    divide = variant == "pix2struct"
    p, t = _to_float(prediction, divide), _to_float(target, divide)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(prediction.lower() == target.lower())


def chartqa_score(prediction: str, answers: Sequence[str] | str, **kwargs) -> float:
    """Relaxed accuracy against the (usually single) ChartQA label; max over several labels."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    return max((relaxed_accuracy(prediction, a, **kwargs) for a in answers), default=0.0)


# ----------------------------------------------------------------------------------------------------------------
# POPE, GQA, SEED, ScienceQA
# ----------------------------------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """LLaVA's eval_pope: keep the first sentence, drop commas, split on spaces; "No" / "no" / "not" as a word
    means "no", anything else (including an empty answer) "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """POPE confusion counts and scores, predictions parsed by :func:`pope_parse`; any label but "no" is positive.

    Returns TP, FP, TN, FN, accuracy, precision, recall, f1 and yes_ratio (share of predicted "yes"). Where the
    official script would divide by zero (no positive prediction...) the value is 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    preds = [1 if pope_parse(p) == "yes" else 0 for p in predictions]
    gts = [0 if label == "no" else 1 for label in labels]
    tp = sum(1 for p, g in zip(preds, gts) if p == 1 and g == 1)
    fp = sum(1 for p, g in zip(preds, gts) if p == 1 and g == 0)
    tn = sum(1 for p, g in zip(preds, gts) if p == 0 and g == 0)
    fn = sum(1 for p, g in zip(preds, gts) if p == 0 and g == 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = len(preds)
    return {
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": preds.count(1) / total if total else 0.0,
    }


def gqa_normalize(text: str) -> str:
    """LLaVA's convert_gqa_for_eval: strip trailing periods, lower-case (no other normalisation)."""
    return text.rstrip(".").lower()


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA's eval.py: exact match of the converted prediction with the gold answer."""
    return float(gqa_normalize(prediction) == answer)


def gqa_scores(records: Iterable[Mapping]) -> dict:
    """GQA eval.py accuracies from records with ``prediction``, ``answer`` and ``structural`` (the question's
    ``types.structural``): ``accuracy``, and ``binary`` / ``open`` (open = structural type "query", binary = every
    other type: verify, logical, choose, compare), x100; a breakdown is ``None`` when it has no question."""
    scores: dict[str, list[float]] = {"accuracy": [], "binary": [], "open": []}
    for r in records:
        score = gqa_accuracy(r["prediction"], r["answer"])
        scores["accuracy"].append(score)
        if r.get("structural") is not None:
            scores["open" if r["structural"] == "query" else "binary"].append(score)
    return {k: (100 * sum(v) / len(v) if v else None) for k, v in scores.items()}


def seed_correct(prediction: str, answer: str) -> float:
    """LLaVA's convert_seed_for_submission: the generated text must equal the answer letter exactly ("A.": wrong)."""
    return float(prediction == answer)


_SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_RE = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str, options: Sequence[str] = _SQA_OPTIONS) -> str:
    """LLaVA-1.5's eval_science_qa: a bare letter, "X. ..." at the start, or exactly one "The answer is X." match;
    otherwise "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_RE.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_correct(
    text: str, answer_index: int, num_choices: int, failed: str = "wrong", rng: random.Random | None = None
) -> float:
    """1.0 when the parsed letter is the answer among the first ``num_choices`` options.

    ``failed="wrong"`` (LLaVA-1.5, default) scores unparsable or out-of-range letters as wrong; ``failed="random"``
    (LLaVA-1.0) picks a random option with ``rng`` (seeded by the caller for reproducibility).
    """
    letter = scienceqa_parse(text)
    valid = _SQA_OPTIONS[:num_choices]
    if letter in valid:
        index = valid.index(letter)
    elif failed == "random":
        index = (rng or random.Random(0)).randrange(num_choices)
    else:
        index = -1
    return float(index == answer_index)


# ----------------------------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME calculation.py: lower-cased "yes"/"no", else whichever of them occurs in the first 4 characters
    ("yes" first), else "other" (counted wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores from records with ``category``, ``image``, ``label`` ("Yes"/"No") and ``prediction``.

    Per subtask: acc (share of questions right) and acc+ (share of images with all their questions right), both
    x100, score = acc + acc+, and ``other_answers`` (answers read as neither yes nor no: the calculation script's
    per-subtask "other" count). Totals: ``perception`` (10 subtasks, max 2000, the number LLaVA reports as MME),
    ``cognition`` (4 subtasks, max 800), ``total``, ``other_answers``.
    """
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    for r in records:
        parsed = mme_parse(r["prediction"])
        by_task[r["category"]][str(r["image"])].append(parsed == str(r["label"]).lower())
        other[r["category"]] += parsed == "other"
    subtasks = {}
    for task, images in by_task.items():
        answers = [x for qs in images.values() for x in qs]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(qs) for qs in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "other_answers": other[task]}
    perception = sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "other_answers": sum(other.values()),
        "subtasks": subtasks,
    }


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice: MMBench (circular), Q-Bench
# ----------------------------------------------------------------------------------------------------------------

_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


# VLMEvalKit's pattern for verbose answers ("The correct answer is **B**.", "the answer is c"): case-insensitive,
# optional "correct" and markdown bold, no word boundary after the letter (so "answer is apple" reads as A).
_VERBOSE_ANSWER_RE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _can_infer_option(answer: str, choices: Mapping[str, str], verbose: bool = False) -> str | bool:
    """VLMEvalKit ``can_infer_option``, rule for rule."""
    if "Failed to obtain answer via API" in answer:
        return False
    for refusal in _MMBENCH_REFUSALS:
        if refusal in answer:
            return "Z"
    mod = answer
    for ch in ".()[],:;!*#{}":
        mod = mod.replace(ch, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for c in choices:
            # [IMPORTANT] "A" in a longer answer may be the article ("A cat sits..."): only VLMEvalKit's verbose mode
            # refuses to guess (and then returns at once, skipping the "answer is X" fallback).
            if verbose and "A" in splits and len(splits) > 3:
                return False
            # [IMPORTANT] the letter counts only among the last five tokens (its first occurrence, as list.index).
            if c in splits and splits.index(c) > len(splits) - 5:
                return c
    elif count == 0 and "Z" in splits:
        return "Z"
    match = _VERBOSE_ANSWER_RE.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return False


def _can_infer_text(answer: str, choices: Mapping[str, str]) -> str | bool:
    """VLMEvalKit ``can_infer_text``: refused when the answer is more than twice as long as all option texts
    together; else the one option whose (lower-cased) text the answer contains."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    candidates = [k for k, v in choices.items() if str(v).lower() in answer]
    return candidates[0] if len(candidates) == 1 else False


def mcq_extract(answer: str, choices: Mapping[str, str], verbose: bool = False) -> str | None:
    """VLMEvalKit ``can_infer``: an option letter among the last tokens of the answer (or "answer is X"), else a
    lone option text contained in a not-much-longer answer; "Z" for refusals; ``None`` when nothing can be
    inferred. ``verbose`` = VLMEvalKit's ``VERBOSE`` environment mode (adds the "A may be an article" guard)."""
    answer = str(answer)
    found = _can_infer_option(answer, choices, verbose) or _can_infer_text(answer, choices)
    return found or None


def _llava_auto_parse(answer: str, choices: Mapping[str, str]) -> str | None:
    letters = list(choices)
    bare = answer.strip(".").strip().upper()
    if bare in letters:
        return bare
    expanded = [f"The answer is {c}.".lower() in answer.lower() for c in letters]
    if any(expanded):
        return letters[expanded.index(True)]
    matched = [c for c, text in choices.items() if answer.lower() in str(text).lower()]
    return matched[0] if len(matched) == 1 else None


def mmbench_extract(
    answer: str, choices: Mapping[str, str], method: str = "vlmevalkit", verbose: bool = False
) -> str | None:
    """The option letter an MMBench answer picks, or ``None`` (then a judge model may be asked, else wrong).

    ``method="vlmevalkit"`` (default): :func:`mcq_extract`, what the MMBench server / VLMEvalKit run before their
    ChatGPT fallback (``verbose``: its VERBOSE mode). ``method="llava"``: LLaVA's ``auto_parse_answer`` (bare
    letter, "The answer is X.", or the answer contained in exactly one option).
    """
    if method == "vlmevalkit":
        return mcq_extract(answer, choices, verbose)
    if method == "llava":
        return _llava_auto_parse(answer, choices)
    raise ValueError(f"method must be 'vlmevalkit' or 'llava', got {method!r}")


def mmbench_rotations(options: Sequence[str]) -> list[list[str]]:
    """The circular shifts of an option list, as LLaVA's ``--all-rounds`` and MMBench's CircularEval build them:
    round k presents ``options[k:] + options[:k]`` under the letters A, B, ..."""
    return [list(options[k:]) + list(options[:k]) for k in range(len(options))]


def mmbench_circular(records: Iterable[Mapping]) -> dict:
    """CircularEval: a question counts right only if every rotation of it is right.

    Records need ``group`` (the question, e.g. MMBench ``index % 1_000_000``), ``correct`` (bool) and optionally
    ``category`` / ``l2_category``. Returns overall accuracy x100, per-category accuracies and the counts.
    """
    groups: dict = defaultdict(list)
    cats: dict = {}
    for r in records:
        groups[r["group"]].append(bool(r["correct"]))
        cats[r["group"]] = (r.get("category"), r.get("l2_category"))
    right = {g: all(v) for g, v in groups.items()}
    out = {
        "accuracy": 100 * sum(right.values()) / len(right) if right else 0.0,
        "questions": len(right),
        "rows": sum(len(v) for v in groups.values()),
    }
    for level, name in ((0, "category"), (1, "l2_category")):
        per: dict = defaultdict(list)
        for g, ok in right.items():
            if cats[g][level] is not None:
                per[cats[g][level]].append(ok)
        if per:
            out[name] = {k: 100 * sum(v) / len(v) for k, v in sorted(per.items())}
    return out


def qbench_correct(prediction: str, candidates: Sequence[str], correct: str) -> float:
    """Q-Bench (LLVisionQA) rule scoring: the option picked by :func:`mcq_extract` (letter, or a lone candidate
    text in the answer) must be the correct candidate. Q-Bench's own scorer asks GPT; this is the rule-based
    equivalent VLMEvalKit uses before its judge."""
    choices = {chr(65 + i): c for i, c in enumerate(candidates)}
    letter = mcq_extract(prediction, choices)
    return float(letter is not None and choices.get(letter) == correct)


# ----------------------------------------------------------------------------------------------------------------
# OCRBench, FUNSD, SROIE (MultimodalOCR containment rule)
# ----------------------------------------------------------------------------------------------------------------

OCRBENCH_CATEGORIES = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition", "Handwriting Recognition",
    "Digit String Recognition", "Non-Semantic Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
    "Key Information Extraction", "Handwritten Mathematical Expression Recognition",
)  # fmt: skip


def ocrbench_match(prediction: str, answers: Sequence[str] | str, dataset_name: str = "") -> int:
    """OCRBench: 1 if any answer is contained in the prediction. HME100k (formulas): case-sensitive, all spaces and
    newlines removed; everything else: lower-cased, stripped, newlines as spaces."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if dataset_name == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return int(any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers))
    pred = prediction.lower().strip().replace("\n", " ")
    return int(any(a.lower().strip().replace("\n", " ") in pred for a in answers))


def contains_match(prediction: str, answers: Sequence[str] | str) -> float:
    """MultimodalOCR accuracy used for FUNSD / SROIE (and optionally the OCR-VQA sets): an answer, lower-cased and
    stripped, occurs in the lower-cased prediction."""
    return float(ocrbench_match(prediction, answers))


# LayTextLLM's normalisation of key-value answers: lower-case; drop spaces, brackets, periods, commas, newlines, -.
_KV_STRIP = str.maketrans("", "", " ().,\n-")


def kv_field(question: str, dataset: str) -> str:
    """The field a key-value question asks about, as LayTextLLM's eval_fscore cuts it from the prompt (SROIE:
    between "What is the" and "in this receipt?"; FUNSD: between "content in the " and " field?", quotes
    stripped); questions of another shape are their own field."""
    if dataset == "sroie" and "What is the" in question:
        return question.split("What is the")[-1].split("in this receipt?")[0]
    if dataset == "funsd" and "content in the " in question:
        return question.split("content in the ")[-1].split(" field?")[0].strip('"')
    return question


def kv_fscore(records: Iterable[Mapping]) -> dict:
    """LayTextLLM's ``evalFscore`` (the LLaVAR-2 / LayTextLLM FUNSD and SROIE convention): entity-level micro
    precision / recall / F1 over (document, field) groups, from records with ``doc``, ``field``, ``answers`` (list)
    and ``prediction``.

    Values are normalised (``_KV_STRIP``) and deduplicated per (document, field). A ground-truth value is a true
    positive when it is contained in a predicted value of its field (else a false negative); a predicted value is a
    false positive when it is contained in no ground-truth value of its field (the two containment directions
    differ, as in the original). Fields are the stripped names; only fields with ground truth count.
    """
    gts: dict = defaultdict(lambda: defaultdict(list))
    preds: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        gts[r["doc"]][r["field"]].extend(r["answers"])
        preds[r["doc"]][r["field"]].append(r["prediction"])
    tp = fp = fn = 0
    for doc, fields in gts.items():
        gt_set = {k.strip(): {v.lower().translate(_KV_STRIP) for v in vs} for k, vs in fields.items()}
        pred_set = {k.strip(): {v.lower().translate(_KV_STRIP) for v in vs} for k, vs in preds[doc].items()}
        for label, gt_values in gt_set.items():
            predicted = pred_set.get(label, set())
            tp += sum(1 for g in gt_values if any(g in p for p in predicted))
            fp += sum(1 for p in predicted if all(p not in g for g in gt_values))
            fn += sum(1 for g in gt_values if all(g not in p for p in predicted))
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def ocrbench_scores(records: Iterable[Mapping]) -> dict:
    """OCRBench totals from records with ``type`` (category), ``dataset_name``, ``answers``, ``prediction``:
    per-category counts, ``text_recognition`` (the six recognition categories) and ``final`` (out of 1000)."""
    per = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for r in records:
        per[r["type"]] = per.get(r["type"], 0) + ocrbench_match(
            r["prediction"], r["answers"], r.get("dataset_name", "")
        )
    recognition = sum(per[c] for c in OCRBENCH_CATEGORIES[:6])
    return {"final": sum(per.values()), "text_recognition": recognition, "categories": per}


# ----------------------------------------------------------------------------------------------------------------
# Judge outputs: MM-Vet, LLaVA-Bench
# ----------------------------------------------------------------------------------------------------------------


def mmvet_parse_score(content) -> float | None:
    """MM-Vet evaluator: the first space-separated token as a float, rejected (``None``: ask again) when it does not
    parse or lies above 1.0 / below 0.0 (so, as there, "nan" is accepted)."""
    try:
        score = float(content.split(" ")[0].strip())
    except Exception:  # noqa: BLE001 -- the evaluator's bare except: None content, no token, not a number
        return None
    return None if score > 1.0 or score < 0.0 else score


def _round(value: float, decimals: int) -> float:
    """``round()`` of a numpy float64, as the MM-Vet evaluator rounds (numpy's rounding, not Python's)."""
    import numpy as np

    return float(round(np.float64(value), decimals))


def mmvet_scores(records: Iterable[Mapping], decimals: int = 1) -> dict:
    """The MM-Vet evaluator's tables (one run) from records with ``score`` (0-1) and ``capability`` (list), in
    question-file order, rounded to ``decimals`` (1, the evaluator's default).

    ``total`` and ``capabilities`` (sum of scores / questions with the capability x100; columns by question count,
    most first), and ``capability_integration``: the same per combination of capabilities (named by joining the
    capabilities with "_", in the order the first question with that combination lists them; the evaluator joins a
    Python set, whose order varies between runs), ordered by question count as the evaluator's ``np.argsort``.
    """
    import numpy as np

    records = list(records)
    counter: Counter = Counter()
    combos: list[set] = []
    combo_names: list[str] = []
    combo_counts: list[int] = []
    for r in records:
        caps = list(dict.fromkeys(r.get("capability") or []))
        counter.update(caps)
        if set(caps) not in combos:
            combos.append(set(caps))
            combo_names.append("_".join(caps))
            combo_counts.append(1)
        else:
            combo_counts[combos.index(set(caps))] += 1
    cap_sums = dict.fromkeys(counter, 0.0)
    combo_sums = [0.0] * len(combos)
    total = 0.0
    for r in records:
        caps = set(r.get("capability") or [])
        for c in caps:
            cap_sums[c] += r["score"]
        combo_sums[combos.index(caps)] += r["score"]
        total += r["score"]
    n = len(records)
    order = np.argsort(-np.array(combo_counts)) if combos else []
    return {
        "total": _round(total / n * 100, decimals) if n else 0.0,
        "capabilities": {c: _round(cap_sums[c] / k * 100, decimals) for c, k in counter.most_common()},
        "capability_integration": {
            combo_names[i]: _round(combo_sums[i] / combo_counts[i] * 100, decimals) for i in order
        },
        "capability_counts": dict(counter.most_common()),
        "capability_integration_counts": {combo_names[i]: combo_counts[i] for i in order},
        # the tables' column orders (JSON writers may sort the keys above)
        "capability_order": [c for c, _ in counter.most_common()],
        "capability_integration_order": [combo_names[i] for i in order],
    }


def llava_bench_parse_score(review: str) -> list[float]:
    """LLaVA's eval_gpt_review_bench parse_score: the first line holds two scores (space or comma separated);
    [-1, -1] when it does not."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except (ValueError, AttributeError):
        pass
    return [-1.0, -1.0]


def llava_bench_scores(records: Iterable[Mapping]) -> dict:
    """LLaVA's summarize_gpt_review per category and "all", from records with ``category`` and ``tuple`` =
    [reference score, model score] (unparsed [-1, -1] tuples included, as the original does).

    As the original: the numpy mean of each column is rounded to 3 decimals *before* the relative score
    ``round(model / reference * 100, 1)``; the absolute scores it prints are ``round(mean * 10, 1)`` (out of 100).
    Returns {category: {"relative", "reference", "model"}}.
    """
    import numpy as np

    per: dict = defaultdict(list)
    for r in records:
        per[r["category"]].append(r["tuple"])
        per["all"].append(r["tuple"])
    out = {}
    for k, tuples in sorted(per.items()):
        ref, ours = (round(x, 3) for x in np.asarray(tuples, dtype=float).mean(0).tolist())
        out[k] = {
            "relative": round(ours / ref * 100, 1) if ref else None,
            "reference": round(ref * 10, 1),
            "model": round(ours * 10, 1),
        }
    return out
