"""Prefix reuse across turns: the Python `Conversation` keeps its KV cache, and the server's engine keeps the KV
of finished requests (LRU, bounded); greedy answers equal those without reuse."""
import queue

import pytest
import torch

import monovl

TURNS = [("What colour is the circle?", ["examples/shapes.png"]), ("And the square?", []),
         ("How many shapes are there?", ["examples/shapes.png"]), ("Which one is the largest?", [])]


@pytest.fixture(scope="module")
def shipped():
    return monovl.load()


def _answers(model, tokenizer, reuse: bool, turns=TURNS, max_tiles=None):
    conv = monovl.Conversation(model, tokenizer, reuse_prefix=reuse, max_tiles=max_tiles)
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
    conv = monovl.Conversation(model, tokenizer, max_tiles=4)  # the shipped model's own budget is one tile
    conv.ask(*TURNS[0], max_new_tokens=8)
    visual = (conv._cached_ids == model.cfg.image_token_id).nonzero().squeeze(1)
    per_tile = model.cfg.num_image_token
    cut = int(visual[per_tile + per_tile // 2])  # inside the second tile
    conv._cached_ids = conv._cached_ids[:cut]  # as if the cache held only that much
    second = conv.ask(*TURNS[1], max_new_tokens=24)
    assert conv.last_reused == int(visual[per_tile])  # the first token of the second tile
    assert second == _answers(model, tokenizer, reuse=False, turns=TURNS[:2], max_tiles=4)[0][1]


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


def _run(engine, prompt, pixels=None, max_tokens=12):
    from monovl.serve import Request, SamplingParams
    events = queue.Queue()
    engine.submit(Request(prompt, pixels, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                          lambda k, v: events.put((k, v))))
    toks = []
    while (event := events.get(timeout=60))[0] == "token":
        toks.append(event[1])
    assert event == ("done", "length")
    return toks


def test_the_engine_reuses_a_finished_turn_and_answers_the_same(shipped):
    from monovl.serve import Engine
    from monovl.template import Turn, add_image_placeholders
    model, tokenizer = shipped
    first = monovl.build_inputs(model, tokenizer, TURNS[0][0], images=TURNS[0][1])
    engine = Engine(model, max_batch=2, max_len=1024, prefill_chunk=64, prefix_cache_bytes=2**30).start()
    try:
        answer = _run(engine, first.input_ids, first.pixel_values)
        assert engine.prefix.hits == 0 and len(engine.prefix.entries) == 1
        history = [Turn(add_image_placeholders(TURNS[0][0], 1), tokenizer.decode(answer), tuple(first.num_tiles))]
        second = monovl.build_inputs(model, tokenizer, TURNS[1][0], history=history)
        want = monovl.generate(model, [second.input_ids], first.pixel_values, max_new_tokens=12)[0].tolist()
        assert _run(engine, second.input_ids, first.pixel_values) == want
        assert engine.prefix.hits == 1 and engine.prefix.tokens_reused >= len(first.input_ids)
    finally:
        engine.shutdown()


def test_the_prefix_cache_is_lru_and_bounded():
    from monovl.serve.prefix_cache import PrefixCache
    kv = lambda n: torch.zeros(2, 1, n, 4)  # noqa: E731  (L, n_kv, n, Dh): 64 bytes per token for k and v
    cache = PrefixCache(max_bytes=64 * 50, image_token_id=500, tokens_per_tile=4, min_tokens=2)
    a, b = torch.arange(20), torch.arange(100, 120)
    cache.insert(a, kv(20), kv(20))
    cache.insert(b, kv(20), kv(20))
    assert cache.lookup(torch.cat([a[:10], torch.tensor([7, 7])]))[1] == 10  # a is now the most recent
    cache.insert(torch.arange(200, 220), kv(20), kv(20))  # over budget: b, the least recent, goes
    assert cache.nbytes <= 64 * 50 and cache.lookup(torch.cat([b, b]))[0] is None
    assert cache.lookup(a)[1] == 19  # one token is always left to prefill
    cache.insert(torch.arange(60), kv(60), kv(60))  # larger than the whole budget: not kept
    assert cache.nbytes <= 64 * 50
    image = torch.tensor([1, 2] + [500] * 8 + [3])  # two tiles of 4 image tokens
    cache.insert(image, kv(11), kv(11))
    assert cache.lookup(torch.cat([image[:8], torch.tensor([5, 5, 5])]))[1] == 6  # not inside the second tile
