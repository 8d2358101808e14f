"""The synthetic world's reading curriculum for stage 0: reading drills, associative recall (plain and as
multiple choice / yes-no) and reading conversations in the benchmark formats."""
from __future__ import annotations

import json
import random

from monovl.world import data as D, recall as R
from monovl.world.images import sample_scene


def test_reading_drills_answer_every_question_as_the_description_says():
    rng = random.Random(3)
    for _ in range(40):
        scene = sample_scene(rng)
        caption, text = D.describe(scene), D.reading_drill(scene, random.Random(1))
        assert text.startswith(caption + " ")
        asked = text[len(caption):]
        for qa in D.questions(scene):
            assert f" {qa.question} {qa.answer}." in asked


def test_recall_drills_repeat_every_key_with_its_value_and_score_only_the_values(world):
    keys, values = R.recall_vocabulary(D.invent_facts(random.Random(0)), random.Random(1))
    assert len(keys) >= 40 and not set(keys) & set(values) and all(w.isalpha() for w in keys + values)
    for gaps, name in (((" is",), "recall_gaps"), (("",), "recall")):
        drill = R.recall_drill(keys, values, random.Random(2), gaps=gaps)
        context, *queries = drill["segments"]
        assert context["loss"] is False and len(queries) == 16
        words = context["text"].rstrip(".").split()
        pairs = dict(zip(words[::2], words[1::2]))
        asked = [q["text"].split()[0] for q in queries[::2]]
        assert sorted(asked) == sorted(pairs) and all(q["loss"] is False for q in queries[::2])
        assert all(q["text"].endswith(gaps[0]) for q in queries[::2])
        assert [v["text"].strip() for v in queries[1::2]] == [pairs[k] for k in asked]
        assert all(v.get("loss", True) for v in queries[1::2])
        lines = (world / "text" / f"{name}.jsonl").read_text().splitlines()
        assert lines and all(len(json.loads(line)["segments"]) == 17 for line in lines)


def test_recall_choice_asks_keys_as_multiple_choice_or_yes_no_and_scores_only_the_answers(world):
    keys, values = R.recall_vocabulary(D.invent_facts(random.Random(0)), random.Random(1))
    kinds = set()
    for seed in range(20):
        context, *turns = R.recall_choice(keys, values, random.Random(seed))["segments"]
        words = context["text"].rstrip(".").split()
        pairs = dict(zip(words[::2], words[1::2]))
        assert context["loss"] is False and len(pairs) == 8 and len(turns) == 12
        for asked, answer in zip(turns[::2], turns[1::2]):
            assert asked["loss"] is False and answer.get("loss", True)
            key = asked["text"].split()[0].rstrip("?")
            if asked["text"].endswith(D.MC):
                options = [line[3:] for line in asked["text"].splitlines()[2:6]]
                assert len(set(options)) == 4 and set(options) <= set(pairs.values())
                assert answer["text"] == " " + D.LETTERS[options.index(pairs[key])]
                kinds.add("mc")
            else:
                assert asked["text"].endswith(D.YESNO)
                candidate = asked["text"].split()[1].rstrip("?")
                assert answer["text"] == (" Yes" if candidate == pairs[key] else " No")
                kinds.add(answer["text"])
    assert kinds == {"mc", " Yes", " No"}
    lines = (world / "text" / "recall_choice.jsonl").read_text().splitlines()
    assert lines and all(len(json.loads(line)["segments"]) == 13 for line in lines)


def test_reading_conversations_describe_once_and_answer_in_the_benchmark_formats():
    rng = random.Random(4)
    for _ in range(20):
        scene = sample_scene(rng)
        turns = D.reading_conversation(scene, random.Random(2))
        asked, answers = turns[0::2], [t["value"] for t in turns[1::2]]
        assert len(asked) == 6 and asked[0]["value"].startswith(f"Here is a picture: {D.describe(scene)}\n")
        assert all("Here is a picture" not in t["value"] for t in asked[1:])
        truths = {qa.answer for qa in D.questions(scene)}
        for q, a in zip(asked, answers):
            if q["value"].endswith(D.SHORT):
                assert a in truths
            elif q["value"].endswith(D.YESNO):
                assert a in ("Yes", "No")
            else:
                assert q["value"].endswith(D.MC) and a in D.LETTERS
