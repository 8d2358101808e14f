"""The batching engine and the cache-row forward it relies on, without HTTP."""
import queue
import threading

import pytest
import torch

import monovl
from monovl.config import preset
from monovl.scratch import new_model
from monovl.serve import Engine, QueueFull, Request, SamplingParams


@pytest.fixture(scope="module")
def loaded(random_loaded):
    return random_loaded


def test_forward_over_cache_rows_equals_own_caches():
    cfg = preset("debug")
    model = new_model(cfg, seed=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 400, (1, 7), generator=g), torch.randint(0, 400, (1, 5), generator=g)
    with torch.inference_mode():
        shared = model.new_cache(3, 32)
        model(a, input_pos=torch.arange(7)[None], cache=shared, cache_rows=torch.tensor([2]))
        model(b, input_pos=torch.arange(5)[None], cache=shared, cache_rows=torch.tensor([0]))
        step = torch.tensor([[11], [12]])
        pos = torch.tensor([[7], [5]])
        got = model(step, input_pos=pos, cache=shared, cache_rows=torch.tensor([2, 0]))[:, 0]  # (2, V)
        want = []
        for prompt, tok in ((a, 11), (b, 12)):
            own = model.new_cache(1, 32)
            model(prompt, input_pos=torch.arange(prompt.shape[1])[None], cache=own)
            want.append(model(torch.tensor([[tok]]), input_pos=torch.tensor([[prompt.shape[1]]]), cache=own)[0, 0])
        assert torch.equal(shared.k[:, 1], torch.zeros_like(shared.k[:, 1]))  # row 1 untouched
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


def _run(engine, prompt, **params):
    events = queue.Queue()
    engine.submit(Request(torch.tensor(prompt), None, SamplingParams(**params), lambda k, v: events.put((k, v))))
    toks = []
    while True:
        kind, value = events.get(timeout=30)
        if kind == "token":
            toks.append(value)
        else:
            return toks, kind, value


def test_greedy_batched_equals_alone_and_chunked_prefill(loaded):
    model, tok = loaded
    prompts = [tok.encode(f"What colour is shape {i}? " * (i + 1)) for i in range(5)]
    want = [monovl.generate(model, [torch.tensor(p)], max_new_tokens=12)[0].tolist() for p in prompts]
    engine = Engine(model, max_batch=3, max_len=256, prefill_chunk=7).start()
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = _run(engine, prompts[i], max_tokens=12, ignore_eos=True)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r[0] for r in results] == want
        assert all(r[1:] == ("done", "length") for r in results)
        assert engine.active == 0 and engine.queue_depth == 0
    finally:
        engine.shutdown()


def test_queue_full_and_context_limit(loaded):
    model, tok = loaded
    engine = Engine(model, max_batch=1, max_len=64, max_queue=1)  # not started: nothing leaves the queue
    engine.submit(Request(torch.tensor([1, 2]), None, SamplingParams(), lambda k, v: None))
    with pytest.raises(QueueFull):
        engine.submit(Request(torch.tensor([1, 2]), None, SamplingParams(), lambda k, v: None))
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request(torch.ones(64, dtype=torch.long), None, SamplingParams(), lambda k, v: None))
