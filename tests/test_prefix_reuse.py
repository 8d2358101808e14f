"""Prefix reuse across turns: the Python `Conversation` keeps its KV cache, and the server's engine keeps the KV
of finished requests (LRU, bounded); greedy answers equal those without reuse."""
import pytest
import torch

import monovl

TURNS = [("What colour is the circle?", ["examples/shapes.png"]), ("And the square?", []),
         ("How many shapes are there?", ["examples/shapes.png"]), ("Which one is the largest?", [])]


@pytest.fixture(scope="module")
def shipped():
    return monovl.load()


def _answers(model, tokenizer, reuse: bool, turns=TURNS):
    conv = monovl.Conversation(model, tokenizer, reuse_prefix=reuse)
    answers, reused = [], []
    for question, images in turns:
        before = len(conv._cached_ids)
        answers.append(conv.ask(question, images, max_new_tokens=24))
        reused.append((before, conv.last_reused))
    return answers, reused


def test_conversation_reuses_earlier_turns_and_answers_the_same(shipped):
    model, tokenizer = shipped
    plain, _ = _answers(model, tokenizer, reuse=False)
    reused, counts = _answers(model, tokenizer, reuse=True)
    assert reused == plain
    assert counts[0] == (0, 0)
    for before, used in counts[1:]:  # everything run before (prompt, image, answer) is reused
        assert used == before > 0


def test_a_prefix_that_ends_inside_an_image_tile_backs_off_to_the_tile_start(shipped):
    model, tokenizer = shipped
    conv = monovl.Conversation(model, tokenizer)
    conv.ask(*TURNS[0], max_new_tokens=8)
    visual = (conv._cached_ids == model.cfg.image_token_id).nonzero().squeeze(1)
    per_tile = model.cfg.num_image_token
    cut = int(visual[per_tile + per_tile // 2])  # inside the second tile
    conv._cached_ids = conv._cached_ids[:cut]  # as if the cache held only that much
    second = conv.ask(*TURNS[1], max_new_tokens=24)
    assert conv.last_reused == int(visual[per_tile])  # the first token of the second tile
    assert second == _answers(model, tokenizer, reuse=False, turns=TURNS[:2])[0][1]


def test_an_interrupted_answer_leaves_a_usable_cache(shipped):
    model, tokenizer = shipped
    conv = monovl.Conversation(model, tokenizer)
    conv.ask(*TURNS[0], max_new_tokens=24)
    stream = conv.stream("Describe the picture.", max_new_tokens=24)
    next(stream)
    stream.close()  # Ctrl-C in the chat: this turn is not kept
    assert len(conv.history) == 1
    assert conv.ask(*TURNS[1], max_new_tokens=24) == _answers(model, tokenizer, reuse=False, turns=TURNS[:2])[0][1]
    assert conv.last_reused > 0


def test_stream_generate_with_a_given_cache_equals_a_full_prefill(shipped):
    model, tokenizer = shipped
    ids = monovl.build_inputs(model, tokenizer, "Describe a red square.").input_ids
    full = monovl.generate(model, [ids], max_new_tokens=12)
    cache = model.new_cache(1, len(ids) + 12)
    list(monovl.stream_generate(model, [ids[:10]], max_new_tokens=1, cache=cache))  # fills positions 0..9
    again = monovl.generate(model, [ids], max_new_tokens=12, cache=cache, cached=10)
    assert torch.equal(full, again)
    with pytest.raises(ValueError, match="room"):
        monovl.generate(model, [ids], max_new_tokens=13, cache=cache, cached=10)
