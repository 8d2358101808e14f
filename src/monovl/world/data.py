"""The language of the synthetic world: captions, questions, invented facts, arithmetic, stage samples.

Everything uses one small closed vocabulary (the names in `images.py`, a few invented names, digits), so a
tiny tokenizer covers it and a tiny model can learn it. The stage builders at the end return one sample each
in the trainer's conversation format; `monovl.world` writes them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from monovl.template import MC_SUFFIX, VQA_SUFFIX, YESNO_SUFFIX, add_image_placeholders
from monovl.world.images import COLOURS, NUMBERS, POSITIONS, SHAPES, WORDS, Scene, Shape, sample_scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHORT, YESNO, MC = "\n" + VQA_SUFFIX, "\n" + YESNO_SUFFIX, "\n" + MC_SUFFIX
LETTERS = "ABCD"


@dataclass(frozen=True)
class QA:
    """One question about a scene: its category, open and yes/no forms, answer and distractor pool."""
    category: str
    question: str
    answer: str
    pool: tuple[str, ...]
    yesno: str  # a template with {} for a candidate answer
    sentence: str = ""  # the answer as a short sentence, for the question asked plainly (no format instruction)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(scene: Scene) -> str:
    """An accurate detailed caption (S1.2)."""
    shape = "wide" if scene.width > scene.height else "tall" if scene.height > scene.width else "square"
    n = len(scene.shapes)
    # the colour also after the noun: "What colour is the star?" then finds its answer right after "star", the
    # one-step look-up that small models learn first (a probe: colour 10 % → 47 % of held-out look-ups at equal steps)
    # shapes in reading order (top row first, left to right), so that the caption is a function of the image: with
    # the sampling order a captioner could not know which shape comes first
    parts = [f"{_a(s.size)} {s.colour} {s.kind} ({s.colour}) at the {s.position}"
             for s in sorted(scene.shapes, key=lambda s: s.cell)]
    text = f"A {shape} picture with a {scene.pattern} {scene.background} background. "
    text += f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'s' * (n > 1)}: {_join(parts)}."
    if scene.text is not None:
        text += " " + written_caption(scene)
    return text


def written_caption(scene: Scene) -> str:
    """The sentence about a picture's written word or number: 'The word "star" is written at the top in red.'"""
    what = "number" if scene.text.isdigit() else "word"
    return f'The {what} "{scene.text}" is written at the {scene.text_position} in {scene.text_colour}.'


def concept_caption(scene: Scene) -> str:
    """The caption of a one-shape picture: "A large red star." (S1.1's single-shape concepts)."""
    shape = scene.shapes[0]
    return f"A {shape.size} {shape.colour} {shape.kind}."


def described(scene: Scene, question: str) -> str:
    """`question` about `scene` asked of a text-only LLM: the picture given as its caption (reading comprehension)."""
    return f"Here is a picture: {describe(scene)}\n{question}"


def alt_text(scene: Scene, rng: random.Random) -> str:
    """A noisy web-like alt text (S1.1): short, sometimes wrong, sometimes irrelevant."""
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(("my picture", "nice colours", "image", "a drawing", "look at this", "new picture"))
    s = rng.choice(scene.shapes)
    colour = rng.choice(sorted(COLOURS)) if roll < 0.3 else s.colour  # partly wrong
    kind = plural(s.kind) if len(scene.shapes) > 1 and rng.random() < 0.3 else s.kind
    text = rng.choice((f"{colour} {kind}", f"{_a(colour)} {kind}", f"{colour} {kind} on {scene.background}",
                       f"shapes on {scene.background}", f"{kind} picture"))
    if scene.text is not None and rng.random() < 0.5:
        text += f" {scene.text}"
    return text


def _unique(scene: Scene, key) -> list[Shape]:
    values = [key(s) for s in scene.shapes]
    return [s for s in scene.shapes if values.count(key(s)) == 1]


def _there(n: int, kind: str) -> str:
    if n == 0:
        return f"There are no {plural(kind)}."
    return f"There is one {kind}." if n == 1 else f"There are {n} {plural(kind)}."


def questions(scene: Scene) -> list[QA]:
    """Every well-defined question about `scene`, by category: colour, shape, count, position, ocr."""
    kinds = [s.kind for s in scene.shapes]
    counts = tuple(str(i) for i in range(5))
    n = len(kinds)
    out = [QA("count", "How many shapes are there in the picture?", str(n), counts[1:],
              "Is the number of shapes in the picture {}?", _there(n, "shape")[:-1] + " in the picture.")]
    absent = [k for k in SHAPES if k not in kinds][:1]  # one shape that is not there: its count is 0
    for kind in sorted(set(kinds)) + absent:
        out.append(QA("count", f"How many {plural(kind)} are there?", str(kinds.count(kind)), counts,
                      f"Is the number of {plural(kind)} {{}}?", _there(kinds.count(kind), kind)))
    for s in _unique(scene, lambda s: s.kind):
        out.append(QA("colour", f"What colour is the {s.kind}?", s.colour, tuple(COLOURS), f"Is the {s.kind} {{}}?",
                      f"The {s.kind} is {s.colour}."))
    for s in _unique(scene, lambda s: s.colour):
        out.append(QA("shape", f"What shape is the {s.colour} object?", s.kind, SHAPES,
                      f"Is the {s.colour} object {{}}?", f"The {s.colour} object is {_a(s.kind)}."))
    for s in scene.shapes:
        out.append(QA("position", f"Where is the {s.name}?", s.position, POSITIONS, f"Is the {s.name} at the {{}}?",
                      f"The {s.name} is at the {s.position}."))
    if scene.text is not None:
        what = "number" if scene.text.isdigit() else "word"
        out.append(QA("ocr", f"What {what} is written in the picture?", scene.text,
                      NUMBERS if what == "number" else WORDS, f'Is the {what} "{{}}" written in the picture?',
                      f'The {what} "{scene.text}" is written in the picture.'))
    return out


def _yesno_question(qa: QA, candidate: str) -> str:
    if qa.category == "shape":
        return qa.yesno.format(_a(candidate))
    return qa.yesno.format(candidate)


def as_yesno(qa: QA, rng: random.Random) -> tuple[str, str]:
    """(question, "Yes"/"No"), balanced."""
    if rng.random() < 0.5:
        return _yesno_question(qa, qa.answer), "Yes"
    return _yesno_question(qa, rng.choice([p for p in qa.pool if p != qa.answer])), "No"


def as_choice(qa: QA, rng: random.Random) -> tuple[list[str], str]:
    """(four options, letter of the right one)."""
    options = rng.sample([p for p in qa.pool if p != qa.answer], 3) + [qa.answer]
    rng.shuffle(options)
    return options, LETTERS[options.index(qa.answer)]


def mc_prompt(question: str, options: list[str]) -> str:
    """The VLMEvalKit multiple-choice prompt of the InternVL family."""
    return question + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options)) + MC


def grounding(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A short grounding question and its InternVL box answer (0–1000 coordinates)."""
    s = rng.choice(scene.shapes)
    x1, y1, x2, y2 = scene.box(s)
    return f"Find the {s.name}.", f"<ref>{s.name}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"


# ---- the invented world: facts and arithmetic (text corpus and text benchmark) ----

SYLLABLES = ("ka", "lo", "mi", "ren", "to", "va", "zu", "bel", "dor", "si", "nar", "pe", "ul", "gri", "fa", "mo")
ANIMAL_KINDS = ("bird", "fish", "cat", "horse", "frog", "snake")


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str
    statements: tuple[str, ...]  # several phrasings; the last is held out of the training corpus


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in used:
            used.add(name)
            return name


FACTS_PER_LAND = 6  # invent_facts gives each land's facts in this order: capital, flag colour, flag shape, animal,
#                    the animal's kind, its colour


def invent_facts(rng: random.Random, *, lands: int = 6) -> list[Fact]:
    """Facts about invented lands (capital, flag colour, flag shape, animal) and animals (kind, colour)."""
    used: set[str] = set()
    facts = []
    for _ in range(lands):
        land, city, animal = _name(rng, used), _name(rng, used), _name(rng, used).lower()
        colour, shape, kind, fur = (rng.choice(tuple(COLOURS)), rng.choice(SHAPES), rng.choice(ANIMAL_KINDS),
                                    rng.choice(tuple(COLOURS)))
        facts += [
            Fact(f"What is the capital of {land}?", city,
                 (f"The capital of {land} is {city}.", f"{city} is the capital of {land}.",
                  f"In {land}, the capital city is {city}.")),
            Fact(f"What colour is the flag of {land}?", colour,
                 (f"The flag of {land} is {colour}.", f"{land} has a {colour} flag.",
                  f"The people of {land} fly a {colour} flag.")),
            Fact(f"What shape is on the flag of {land}?", shape,
                 (f"There is {_a(shape)} on the flag of {land}.", f"The flag of {land} shows {_a(shape)}.",
                  f"{_a(shape).capitalize()} is on the flag of {land}.")),
            Fact(f"Which animal lives in {land}?", animal,
                 (f"The {animal} lives in {land}.", f"In {land} you can see the {animal}.",
                  f"{land} is the home of the {animal}.")),
            Fact(f"What kind of animal is the {animal}?", kind,
                 (f"The {animal} is {_a(kind)}.", f"The {animal} is a kind of {kind}.",
                  f"A {animal} is {_a(kind)} from {land}.")),
            Fact(f"What colour is the {animal}?", fur,
                 (f"The {animal} is {fur}.", f"Every {animal} is {fur}.", f"You can tell the {animal} is {fur}.")),
        ]
    return facts


def arithmetic_pairs(rng: random.Random, *, top: int = 20, heldout: float = 0.15):
    """(train, held-out) lists of (question, answer) for a plus b and a minus b with a, b ≤ `top`."""
    items = [(f"What is {a} plus {b}?", str(a + b)) for a in range(top + 1) for b in range(top + 1)]
    items += [(f"What is {a} minus {b}?", str(a - b)) for a in range(top + 1) for b in range(a + 1)]
    rng.shuffle(items)
    k = int(len(items) * heldout)
    return items[k:], items[:k]


def arithmetic_sentence(question: str, answer: str, rng: random.Random) -> str:
    expr = question[len("What is "):-1]
    return rng.choice((f"{expr} is {answer}.", f"{question} {answer}.", f"{expr} makes {answer}."))


# ---- stage samples ----

def _image(k: int) -> str:
    """The placeholders before a question, numbered as inference numbers them (template.add_image_placeholders)."""
    return add_image_placeholders("", k)


def _turn(scene: Scene, rng: random.Random, *, caption: bool = True,
          grounded: bool = True) -> tuple[str, str, str]:
    """One question about `scene` in a random format: short answer, yes/no, multiple choice, box or caption; with
    its category (a question's, or "caption" / "grounding")."""
    roll = rng.random()
    if caption and roll < 0.1:
        return rng.choice(("Describe the picture.", "Describe the picture in detail.")), describe(scene), "caption"
    if grounded and roll < 0.2:
        return *grounding(scene, rng), "grounding"
    qa = rng.choice(questions(scene))
    if roll < 0.35:
        q, a = as_yesno(qa, rng)
        return q + YESNO, a, qa.category
    if roll < 0.5:
        options, letter = as_choice(qa, rng)
        return mc_prompt(qa.question, options), letter, qa.category
    return qa.question + SHORT, qa.answer, qa.category


def _conv(turns: list[tuple[str, str]], prefix: str) -> list[dict]:
    out = []
    for i, (q, a) in enumerate(turns):
        out += [{"from": "human", "value": (prefix if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return out


def s1_3_conversation(scene: Scene, rng: random.Random) -> tuple[list[dict], str]:
    """A single-turn task sample (S1.3) and its question's category."""
    q, a, category = _turn(scene, rng)
    return _conv([(q, a)], _image(1)), category


def plain_conversation(scene: Scene, rng: random.Random) -> list[dict]:
    """Questions about the picture asked plainly, as people ask them ("What colour is the circle?"), answered in a
    short sentence ("The circle is red."), now and then a description (S2)."""
    qas = questions(scene)
    turns = [(qa.question, qa.sentence) for qa in rng.sample(qas, min(len(qas), rng.randint(1, 3)))]
    if rng.random() < 0.2:
        turns.insert(0, (rng.choice(("Describe the image.", "What is in the picture?")), describe(scene)))
    return _conv(turns, _image(1))


def multi_image_turn(scenes: list[Scene], rng: random.Random) -> tuple[str, str]:
    n1, n2 = len(scenes[0].shapes), len(scenes[1].shapes)
    roll = rng.random()
    if roll < 0.3:
        return "How many shapes are there in the two pictures together?" + SHORT, str(n1 + n2)
    if roll < 0.6:
        answer = "the first" if n1 > n2 else "the second" if n2 > n1 else "neither"
        return "Which picture has more shapes, the first or the second?" + SHORT, answer
    k = rng.randrange(2)
    q, a, _ = _turn(scenes[k], rng, caption=False, grounded=False)
    return f"In the {('first', 'second')[k]} picture: {q}", a


def s2_conversation(scenes: list[Scene], facts: list[Fact], sums: list[tuple[str, str]],
                    rng: random.Random) -> list[dict]:
    """An instruction sample (S2): text-only if no scenes, multi-image if two, else multi-turn on one image."""
    turns = rng.randint(1, 3)
    if not scenes:
        pool = [(f.question, f.answer) for f in facts] + sums
        picks = [rng.choice(pool) for _ in range(turns)]
        return _conv([(q + SHORT if rng.random() < 0.5 else q, a) for q, a in picks], "")
    if len(scenes) == 2:
        return _conv([multi_image_turn(scenes, rng) for _ in range(turns)], _image(2))
    return _conv([_turn(scenes[0], rng)[:2] for _ in range(turns)], _image(1))


def chat_conversation(facts: list[Fact], sums: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """A text-only chat sample for stage 0, the base LLM's own instruction tuning (as internlm2-chat had before
    Mono-InternVL froze it): fact and sum questions in the short, yes/no and multiple-choice formats the visual
    stages use, picture descriptions on request, and questions about a picture described in words (reading
    comprehension: the in-context look-up that the visual tokens later feed) — so the frozen LLM already knows the
    template, the answer formats and how to answer from context, and the visual stages only teach it to see."""
    turns = []
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.5:
            scene = sample_scene(rng)
            q, a, _ = _turn(scene, rng, caption=False, grounded=False)
            turns.append((described(scene, q), a))
            continue
        roll = rng.random()
        if roll < 0.15:
            turns.append((rng.choice(("Describe a picture.", "Describe a picture of shapes in detail.")),
                          describe(sample_scene(rng))))
            continue
        if rng.random() < 0.5:
            i = rng.randrange(len(facts))
            q, a = facts[i].question, facts[i].answer
            pool = sorted({f.answer for j, f in enumerate(facts) if j % FACTS_PER_LAND == i % FACTS_PER_LAND} - {a})
        else:
            q, a = rng.choice(sums)
            pool = [str(int(a) + d) for d in (-3, -2, -1, 1, 2, 3)]
        if roll < 0.35 and pool:
            yes = rng.random() < 0.5
            turns.append((f"{q} Is it {a if yes else rng.choice(pool)}?" + YESNO, "Yes" if yes else "No"))
        elif roll < 0.5 and len(pool) >= 3:
            options = rng.sample(pool, 3) + [a]
            rng.shuffle(options)
            turns.append((mc_prompt(q, options), LETTERS[options.index(a)]))
        else:
            turns.append((q + SHORT if rng.random() < 0.5 else q, a))
    return _conv(turns, "")


def reading_drill(scene: Scene, rng: random.Random) -> str:
    """A scene description followed by every question about it, each answered ("… What colour is the star? red.
    Where is the red star? top left. …"): dense practice in looking up what the text says about a named object,
    the skill that stage 0 must have before the visual stages can build on it."""
    qas = questions(scene)
    rng.shuffle(qas)
    return " ".join([describe(scene)] + [f"{qa.question} {qa.answer}." for qa in qas])


def reading_conversation(scene: Scene, rng: random.Random, *, turns: int = 6) -> list[dict]:
    """Several questions about one described scene in the benchmark formats (short answer, yes/no, multiple
    choice), the description in the first turn only: reading comprehension in the chat template."""
    qas = questions(scene)
    out = []
    for _ in range(turns):
        qa, roll = rng.choice(qas), rng.random()
        if roll < 0.5:
            q, a = qa.question + SHORT, qa.answer
        elif roll < 0.75:
            q, a = as_yesno(qa, rng)
            q += YESNO
        else:
            options, a = as_choice(qa, rng)
            q = mc_prompt(qa.question, options)
        out.append((described(scene, q) if not out else q, a))
    return _conv(out, "")


def corpus_line(kind: str, facts: list[Fact], sums: list[tuple[str, str]], rng: random.Random, *,
                heldout: bool = False) -> str:
    """One text of the base-LLM corpus: facts, arithmetic or a scene description; `heldout` uses the
    held-out phrasings of facts (the sums and scenes given are already held out)."""
    if kind == "fact":
        chosen = rng.sample(facts, rng.randint(1, 3))
        if rng.random() < 0.3 and not heldout:
            return " ".join(f"Question: {f.question} Answer: {f.answer}." for f in chosen)
        return " ".join(f.statements[-1] if heldout else rng.choice(f.statements[:-1]) for f in chosen)
    if kind == "arithmetic":
        return " ".join(arithmetic_sentence(*rng.choice(sums), rng) for _ in range(rng.randint(1, 3)))
    if kind == "scene":
        return describe(sample_scene(rng))
    raise ValueError(f"unknown corpus line kind {kind!r}")
