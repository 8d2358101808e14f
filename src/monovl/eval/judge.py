"""An LLM judge through any OpenAI-compatible chat endpoint, as VLMEvalKit uses one: when exact matching cannot
read a multiple-choice or yes/no answer, the judge is asked which option (or Yes / No) the answer means; its
reply is read with the same exact-matching rules. Replies are cached per row in a JSONL file."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx

from monovl.eval import scoring
from monovl.eval.benchmarks import Item

log = logging.getLogger(__name__)

MC_TEMPLATE = (
    "Your task is to decide which option of a multiple-choice question an answer chooses. You get the question, "
    "its options and the answer. Reply with the letter of the option whose meaning is closest to the answer. "
    "If the answer means none of the options, or refuses to answer, reply {none}. Reply with one capital letter "
    "only: one of {letters}, or {none}.\n"
    "Example 1:\nQuestion: Which fruit is on the plate?\nOptions: A. an apple\nB. a banana\nC. a lemon\n"
    "Answer: it is a long yellow fruit, a banana\nReply: B\n"
    "Example 2:\nQuestion: Which fruit is on the plate?\nOptions: A. an apple\nB. a banana\nC. a lemon\n"
    "Answer: a pineapple\nReply: {none}\n"
    "Now yours:\nQuestion: {question}\nOptions: {options}\nAnswer: {prediction}\nReply: "
)
YESNO_TEMPLATE = (
    "Your task is to decide whether an answer to a yes/no question means Yes or No. You get the question and "
    "the answer. Reply Yes or No, or Unknown when the answer means neither. Reply with that one word only.\n"
    "Example 1:\nQuestion: Is there a dog in the picture?\nAnswer: A dog is sleeping on the sofa.\nReply: Yes\n"
    "Example 2:\nQuestion: Is the text in the picture 'Exit'?\nAnswer: The text says 'Entry'.\nReply: No\n"
    "Now yours:\nQuestion: {question}\nAnswer: {prediction}\nReply: "
)
ATTEMPTS = {"mc": 3, "yesno": 5}  # VLMEvalKit's retries; attempt i samples at temperature 0.5 * i


def build_prompt(item: Item, kind: str, prediction: str) -> str:
    if kind == "mc":
        options = "\n".join(f"{c}. {t}" for c, t in item.options.items())
        return MC_TEMPLATE.format(none=scoring.NO_CHOICE, letters=", ".join(item.options), question=item.question,
                                  options=options, prediction=prediction)
    return YESNO_TEMPLATE.format(question=item.question, prediction=prediction)


@dataclass
class Judge:
    """`url` is the endpoint's base (e.g. http://127.0.0.1:8000/v1); `cache` a JSONL file of past replies."""

    url: str
    model: str
    key: str | None = None
    cache: Path | None = None
    timeout: float = 60.0

    def __post_init__(self):
        self._cached: dict[str, str] = {}
        if self.cache is not None and Path(self.cache).is_file():
            for line in Path(self.cache).read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                self._cached[entry["key"]] = entry["reply"]

    def describe(self) -> dict:
        return {"url": self.url, "model": self.model}  # never the key

    def ask(self, prompt: str, temperature: float) -> str | None:
        """The endpoint's reply to one user message, or None when the request fails."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": temperature, "max_tokens": 16}
        try:
            r = httpx.post(self.url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                           timeout=self.timeout)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            log.warning("judge request failed: %s", e)
            return None

    def extract(self, item: Item, kind: str, prediction: str) -> str | None:
        """The option letter ("Z": none) or 'yes' / 'no' the judge reads in `prediction`; None if it cannot."""
        prompt = build_prompt(item, kind, prediction)
        key = f"{item.index}:{hashlib.sha256((self.model + prompt).encode()).hexdigest()[:16]}"
        if key not in self._cached:
            reply = ""
            for attempt in range(ATTEMPTS[kind]):
                reply = self.ask(prompt, 0.5 * attempt)
                if reply is not None and _read(item, kind, reply) is not None:
                    break
            self._remember(key, reply or "")
        return _read(item, kind, self._cached[key])

    def _remember(self, key: str, reply: str) -> None:
        self._cached[key] = reply
        if self.cache is not None:
            Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
            with Path(self.cache).open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")


def _read(item: Item, kind: str, reply: str) -> str | None:
    return scoring.extract_choice(reply, item.options) if kind == "mc" else scoring.extract_yes_no(reply)
