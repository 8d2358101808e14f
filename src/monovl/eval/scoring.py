"""Scoring rules of the field (VLMEvalKit / EvalAI / DocVQA / ChartQA / OCRBench / MME), one function each.

Every per-question rule returns a float in [0, 1]; aggregation (means, CircularEval, MME acc+) is below.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from monovl.eval.evalai import normalize_vqa, punctuation

__all__ = ["normalize_vqa"]  # re-exported: the VQA rules' normalisation

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: one reference -> exact match after normalisation; several -> mean over i of
    min(1, matches among the other references / 3)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    hits = [r == pred for r in refs]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(refs)


def exact_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """GQA / OCRVQA: 1 if the prediction equals a reference ignoring case and surrounding spaces."""
    pred = prediction.strip().lower()
    return float(any(a.strip().lower() == pred for a in answers))


# ---- ANLS (DocVQA, InfoVQA) ----
def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalized_levenshtein(prediction: str, answer: str) -> float:
    """Edit distance of the case-folded, space-collapsed strings over the longer RAW length (as upper-cased,
    so "ß" counts 2), as VLMEvalKit's `anls_compute` divides; 0 for two empty strings."""
    pred = " ".join(prediction.strip().lower().split())
    ref = " ".join(answer.strip().lower().split())
    length = max(len(answer.upper()), len(prediction.upper()))
    return levenshtein(pred, ref) / length if length else 0.0


def anls(prediction: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """1 - the smallest normalised distance to a reference, or 0 when that is below `tau` (so NL = 0.5 -> 0.5)."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    score = 1.0 - min(normalized_levenshtein(prediction, a) for a in answers)
    return 0.0 if score < tau else score


# ---- relaxed accuracy (ChartQA) ----
def _to_float(text: str) -> float | None:
    """Python's float() of the text (so "1,000" is not a number), a trailing % dividing by 100."""
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """Max over references of: relative error <= `tolerance` when the stripped prediction and the reference are
    numbers and the reference is not 0; else equality ignoring case (the reference is not stripped)."""
    pred = prediction.strip()
    pred_num = _to_float(pred)
    for answer in answers:
        ref_num = _to_float(answer)
        if pred_num is not None and ref_num:
            ok = abs(pred_num - ref_num) / abs(ref_num) <= tolerance
        else:
            ok = pred.lower() == answer.lower()
        if ok:
            return 1.0
    return 0.0


# ---- OCRBench ----
OCRBENCH_MATH = "Handwritten Mathematical Expression Recognition"


def _ocr_norm(text: str, math: bool) -> str:
    if math:
        return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")


def ocrbench_hit(prediction: str, answers: Sequence[str], category: str | None = None) -> float:
    """1 if any normalised reference is a substring of the normalised prediction. Normalised: lower case,
    stripped, newlines as spaces; for handwritten math expressions: stripped, then every space and newline
    removed, case kept."""
    math = category == OCRBENCH_MATH
    pred = _ocr_norm(prediction, math)
    return float(any(_ocr_norm(a, math) in pred for a in answers))


# ---- multiple choice and yes/no extraction (VLMEvalKit's `can_infer`, exact-matching mode) ----
NO_CHOICE = "Z"  # what a refusal or "none of the options" is extracted as; it matches no answer letter
_LETTER_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"


def _choice_letter(prediction: str, letters: Sequence[str]) -> str | None:
    """The option letter written as a token of its own among the last four tokens, when exactly one option
    letter occurs (tokens split at spaces and . ( ) [ ] , : ; ! * # { }; quotes are kept, so "'A'" is no
    letter); Z for a refusal or a lone Z; else the letter of "answer is X" / "correct answer is **X**"."""
    if _API_FAILURE in prediction:
        return None
    if any(r in prediction for r in _REFUSALS):
        return NO_CHOICE
    tokens = _LETTER_SEPARATORS.sub(" ", prediction).split()
    named = [c for c in letters if c in tokens]
    if len(named) == 1 and tokens.index(named[0]) > len(tokens) - 5:
        return named[0]
    if not named and NO_CHOICE in tokens:
        return NO_CHOICE
    m = _ANSWER_IS.search(prediction)
    return m.group(1).upper() if m and m.group(1).upper() in letters else None


def _choice_text(prediction: str, options: dict[str, str]) -> str | None:
    """The one option whose text (ignoring case) is a substring of the prediction; none when the prediction is
    longer than twice all option texts together, or when several or no options match."""
    pred = prediction.lower()
    if len(pred) > 2 * sum(len(t) for t in options.values()):
        return None
    found = [c for c, t in options.items() if t.lower() in pred]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a prediction names, "Z" for a refusal, or None when it cannot be told."""
    return _choice_letter(prediction, list(options)) or _choice_text(prediction, options)


def extract_yes_no(prediction: str) -> str | None:
    """'yes' or 'no' when exactly one of the two occurs as a word after EvalAI punctuation handling (so
    "Yes." and "Yes, it is" count, but "**Yes**", "Yes: ...", "Yes。" and "Noël" do not), else None."""
    words = punctuation(prediction.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "yes" if "yes" in words else "no"
    return None


def score_mc(prediction: str, options: dict[str, str], answer: str) -> tuple[float, str | None]:
    letter = extract_choice(prediction, options)
    return float(letter is not None and letter == answer.strip()), letter


def score_yes_no(prediction: str, answer: str) -> tuple[float, str | None]:
    said = extract_yes_no(prediction)
    return float(said is not None and said == answer.strip().lower()), said


# ---- aggregation ----
def circular_accuracy(hits: dict[int, float]) -> tuple[float, int]:
    """(accuracy, questions) where a question (index mod 1e6) counts only if all its copies are right."""
    groups: dict[int, bool] = {}
    for index, hit in hits.items():
        g = index % 1_000_000
        groups[g] = groups.get(g, True) and hit >= 1.0
    return (sum(groups.values()) / len(groups) if groups else 0.0), len(groups)


MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                  "posters", "scene")
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def mme_scores(rows: Sequence[tuple[str, str, float]]) -> dict:
    """rows of (category, image_key, hit) -> per category acc, acc+ (all questions of an image right) and
    the MME score 100 * (acc + acc+); `score` sums every category; `perception` and `cognition` (VLMEvalKit's
    "reasoning") sum MME's ten and four categories, where present, and `total` is their sum."""
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for category, image, hit in rows:
        by_cat[category][image].append(hit)
    out = {"categories": {}, "score": 0.0}
    for category, images in by_cat.items():
        hits = [h for hs in images.values() for h in hs]
        acc = sum(hits) / len(hits)
        acc_plus = sum(all(h >= 1.0 for h in hs) for hs in images.values()) / len(images)
        out["categories"][category] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
        out["score"] += 100 * (acc + acc_plus)
    if any(c in by_cat for c in MME_PERCEPTION + MME_COGNITION):
        for name, group in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
            out[name] = sum(out["categories"][c]["score"] for c in group if c in by_cat)
        out["total"] = out["perception"] + out["cognition"]
    return out
