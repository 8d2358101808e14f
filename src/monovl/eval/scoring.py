"""Scoring rules of the field (VLMEvalKit / EvalAI / DocVQA / ChartQA / OCRBench / MME), one function each.

Every per-question rule returns a float in [0, 1]; aggregation (means, CircularEval, MME acc+) is below.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

# ---- EvalAI VQA answer normalisation ----
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # the official pattern's effect: a period not followed by a digit goes
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings -> EvalAI's spelling (the common part of its table).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whats": "what's", "whod": "who'd",
    "whos": "who's", "whove": "who've", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_vqa(text: str) -> str:
    """EvalAI normalisation: punctuation, periods, lower case, number words -> digits, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        # Punctuation next to a space, or any text with a thousands comma, loses it; else it becomes a space.
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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


# ---- ANLS (DocVQA, InfoVQA) ----
def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """max over references of 1 - NL (NL = edit distance / longer length, case-folded, spaces collapsed),
    or 0 where NL >= tau."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        length = max(len(pred), len(ref))
        nl = levenshtein(pred, ref) / length if length else 0.0
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


# ---- relaxed accuracy (ChartQA) ----
def _to_float(text: str) -> float | None:
    text = text.strip().replace(",", "")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """1 if a numeric prediction is within `tolerance` relative error of a numeric reference, or the strings
    are equal ignoring case; max over references."""
    for answer in answers:
        pred, ref = _to_float(prediction), _to_float(answer)
        if pred is not None and ref is not None:
            ok = pred == ref if ref == 0 else abs(pred - ref) / abs(ref) <= tolerance
        else:
            ok = prediction.strip().lower() == answer.strip().lower()
        if ok:
            return 1.0
    return 0.0


# ---- OCRBench ----
def _ocr_norm(text: str, math: bool) -> str:
    return text.replace("\n", "").replace(" ", "") if math else text.lower().strip().replace("\n", " ")


def ocrbench_hit(prediction: str, answers: Sequence[str], category: str | None = None) -> float:
    """1 if any normalised reference is a substring of the normalised prediction. Normalised: lower case,
    stripped, newlines as spaces; for handwritten math expressions: all spaces and newlines removed, case kept."""
    math = category == "Handwritten Mathematical Expression Recognition"
    pred = _ocr_norm(prediction, math)
    return float(any(_ocr_norm(a, math) in pred for a in answers))


# ---- multiple choice and yes/no extraction ----
_STRIP_CHARS = re.compile(r"[.()\[\],:;!*#{}\"'`]")


def _contains_phrase(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` ignoring case, not inside a longer word ("no" is not in "cannot")."""
    pattern = r"(?<!\w)" + re.escape(phrase.strip().lower()) + r"(?!\w)"
    return re.search(pattern, text.lower()) is not None


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a prediction names, or None when it cannot be told.

    First a letter of `options` standing as a word of its own (exactly one such letter; a lone 'A' in a
    longer sentence is read as the article); else the one option whose text the prediction contains
    (ignoring case, as whole words; texts contained in a longer matching option are dropped).
    """
    words = _STRIP_CHARS.sub(" ", prediction).split()
    letters = {w for w in words if w in options}
    if len(letters) == 1:
        (letter,) = letters
        if not (letter == "A" and len(words) > 3):
            return letter
    found = [c for c, t in options.items() if t.strip() and _contains_phrase(prediction, t)]
    found = [c for c in found if not any(o != c and _contains_phrase(options[o], options[c]) for o in found)]
    return found[0] if len(found) == 1 else None


def extract_yes_no(prediction: str) -> str | None:
    """'yes' or 'no' when exactly one of the two words occurs, else None."""
    words = set(re.sub(r"[^a-z]+", " ", prediction.lower()).split())
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


def mme_scores(rows: Sequence[tuple[str, str, float]]) -> dict:
    """rows of (category, image_key, hit) -> per category acc, acc+ (all questions of an image right) and
    the MME score 100 * (acc + acc+), summed over categories."""
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
    return out
