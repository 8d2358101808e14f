"""Training data pipeline: rendering and labels, sources, bad data, overlong policy, packing, sharding, resume."""
import copy
import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F

from monovl.config import preset
from monovl.scratch import new_model
from pictures import png
from random_checkpoint import SAMPLE_TEXT
from monovl.template import IM_END, render
from monovl.tokenizer import Tokenizer, build_bpe_tokenizer
from monovl.train.data import DataConfig, SourceConfig, TrainLoader, _items, _parse, expand_meta
from monovl.train.packing import IGNORE, BadSample, Packer, Renderer, Sample, collate
from tokenizer_fixture import make_sp_tokenizer_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_bpe_tokenizer([SAMPLE_TEXT] * 4, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_cfg(tok):
    cfg = preset("debug", vocab_size=tok.vocab_size)
    cfg.image_token_id = tok.img_context_id
    return cfg


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    for i in range(4):
        (tmp_path / f"img{i}.png").write_bytes(png((40 + 30 * i, 30), (60 * i, 100, 200)))
    _jsonl(tmp_path / "pairs.jsonl", [{"image": f"img{i}.png", "caption": f"A shape number {i}."} for i in range(4)])
    _jsonl(tmp_path / "text.jsonl", [{"text": f"There are {i} red circles."} for i in range(6)])
    convs = [
        {"image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                {"from": "gpt", "value": "Blue."},
                                                {"from": "human", "value": "How many?"},
                                                {"from": "gpt", "value": "Two."}]},
        {"image": ["img1.png", "img2.png"], "conversations": [{"from": "human", "value": "Compare."},
                                                              {"from": "gpt", "value": "The left is red."}]},
        {"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]},
    ]
    _jsonl(tmp_path / "conv.jsonl", convs)
    return tmp_path


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _assistant_text(tok, sample):
    return tok.decode([i for i, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE], skip_special_tokens=False)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_conversation_ids_equal_full_encoding_and_labels_are_the_answers(kind, tok, model_cfg, tmp_path, data_dir):
    if kind == "sentencepiece":
        make_sp_tokenizer_dir(tmp_path / "sp")
        tok = Tokenizer.from_dir(tmp_path / "sp")
        model_cfg = preset("debug", vocab_size=tok.vocab_size)
        model_cfg.image_token_id = tok.img_context_id
    render_ = Renderer(DataConfig(seq_len=4096, system="Be brief."), tok, model_cfg)
    src = SourceConfig("conversations", str(data_dir / "conv.jsonl"))
    for (_, raw), answers in zip(_items(src, 0, 1), [["Blue.", "Two."], ["The left is red."], ["Yes."]]):
        item = _parse(src, raw, "unused")
        s = render_(item)
        text = tok.decode(s.input_ids[1:], skip_special_tokens=False)
        assert s.input_ids == tok.encode(text)  # one BOS, exactly the full encoding
        assert s.input_ids.count(tok.bos_id) == 1 and s.input_ids[0] == tok.bos_id
        assert _assistant_text(tok, s) == "".join(a + IM_END for a in answers)
        n_images = len(item["images"])
        assert text.count("<img>") == n_images
        assert (s.pixel_values is None) == (n_images == 0)
        if n_images:
            assert s.input_ids.count(tok.img_context_id) == len(s.pixel_values) * model_cfg.num_image_token
    assert text == render([{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
                          system="Be brief.")


def test_pairs_webdataset_and_text_samples(tok, model_cfg, data_dir):
    cfg = DataConfig(seq_len=4096, caption_prompt="Caption it.")
    render_ = Renderer(cfg, tok, model_cfg)
    src = SourceConfig("pairs", str(data_dir / "pairs.jsonl"))
    pair = render_(_parse(src, next(_items(src, 0, 1))[1], cfg.caption_prompt))
    assert _assistant_text(tok, pair) == "A shape number 0." + IM_END
    assert "<img>" in tok.decode(pair.input_ids, skip_special_tokens=False)
    assert tok.decode(pair.input_ids, skip_special_tokens=False).endswith("Caption it.<|im_end|><|im_start|>assistant\n"
                                                                           "A shape number 0.<|im_end|>")
    png = (data_dir / "img1.png").read_bytes()
    _tar(data_dir / "shard-0.tar", [("a/s0.png", png), ("a/s0.txt", b"A red square."), ("a/s1.png", png),
                                    ("a/s1.json", b'{"caption": "Blue."}')])
    wds = SourceConfig("webdataset", str(data_dir))
    got = [_assistant_text(tok, render_(_parse(wds, raw, cfg.caption_prompt))) for _, raw in _items(wds, 0, 1)]
    assert got == ["A red square." + IM_END, "Blue." + IM_END]
    text_src = SourceConfig("text", str(data_dir / "text.jsonl"))
    s = render_(_parse(text_src, next(_items(text_src, 0, 1))[1], ""))
    assert s.input_ids == tok.encode("There are 0 red circles.") + [tok.eos_id]
    assert s.labels == [IGNORE] + s.input_ids[1:]


def test_text_segments_carry_loss_only_where_marked(tok, model_cfg, tmp_path):
    record = {"segments": [{"text": "There are", "loss": False}, {"text": " 0 red"}, {"text": " circles.", "loss": False}]}
    _jsonl(tmp_path / "seg.jsonl", [record, {"segments": [{"text": 3}]}])
    src = SourceConfig("text", str(tmp_path / "seg.jsonl"))
    items = [raw for _, raw in _items(src, 0, 1)]
    s = Renderer(DataConfig(seq_len=4096), tok, model_cfg)(_parse(src, items[0], ""))
    head, mid, tail = (tok.encode(t, add_bos=False) for t in ("There are", " 0 red", " circles."))
    assert s.input_ids == tok.encode("") + head + mid + tail + [tok.eos_id]
    n = len(tok.encode("")) + len(head)
    assert s.labels == [IGNORE] * n + mid + [IGNORE] * len(tail) + [tok.eos_id]
    with pytest.raises(BadSample, match="malformed"):
        _parse(src, items[1], "")
    no_bos = copy.copy(tok)  # a tokenizer without BOS (Qwen): the sample's first token still carries no loss,
    no_bos.bos_id = None  # which a packed row would otherwise predict from the sample before it
    s = Renderer(DataConfig(seq_len=4096), no_bos, model_cfg)(_parse(src, items[0], ""))
    assert s.input_ids == head + mid + tail + [tok.eos_id]
    assert s.labels == [IGNORE] * len(head) + mid + [IGNORE] * len(tail) + [tok.eos_id]
    for item in ({"text": "There are 0 red circles."}, {"segments": [("There are 0 red circles.", True)]}):
        plain = Renderer(DataConfig(seq_len=4096), no_bos, model_cfg)(item)
        assert plain.labels == [IGNORE] + plain.input_ids[1:] and plain.input_ids[0] != tok.bos_id


def test_meta_json_expands_to_conversation_sources(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({
        "llava": {"root": "imgs", "annotation": "ann/llava.jsonl", "repeat_time": 2, "length": 10},
        "ocr": {"annotation": "ocr.jsonl", "repeat_time": 0.5}}))
    a, b = expand_meta(SourceConfig("meta", str(tmp_path / "m.json"), weight=3.0))
    assert (a.kind, a.path, a.root, a.weight, a.name) == (
        "conversations", str(tmp_path / "ann/llava.jsonl"), str(tmp_path / "imgs"), 60.0, "llava")
    assert (b.root, b.weight) == (None, 1.5)


def test_bad_data_is_skipped_and_counted_or_raises_in_strict_mode(tok, model_cfg, data_dir):
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = _jsonl(data_dir / "bad.jsonl", [
        {"image": "img0.png", "caption": "Good one."},
        "{not json",
        {"image": "missing.png", "caption": "x"},
        {"image": "broken.png", "caption": "x"},
        {"caption": "no image key"},
    ])
    mism = _jsonl(data_dir / "mism.jsonl", [{"image": "img0.png", "conversations": [
        {"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "No."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}])
    sources = [SourceConfig("pairs", bad), SourceConfig("conversations", mism)]
    loader = TrainLoader(DataConfig(sources=sources, seq_len=256, micro_batch=1, pack=False), tok, model_cfg)
    batches = iter(loader)
    for _ in range(6):
        next(batches)
    stats = loader.stats
    assert stats.samples == 6
    assert stats.skipped["malformed"] >= 2 and stats.skipped["bad_image"] >= 2
    assert stats.skipped["image_mismatch"] >= 1
    strict = TrainLoader(DataConfig(sources=[SourceConfig("pairs", bad)], seq_len=256, strict=True), tok, model_cfg)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*malformed JSON"):
        next(iter(strict))
    only_mismatch = TrainLoader(DataConfig(sources=[SourceConfig("conversations", mism)], strict=True), tok, model_cfg)
    with pytest.raises(ValueError, match=r"mism\.jsonl:1.*2 <image> placeholders but 1 images"):
        next(iter(only_mismatch))
    all_bad = _jsonl(data_dir / "all_bad.jsonl", ["{", "[]"])
    with pytest.raises(ValueError, match="all_bad.*no usable items"):
        next(iter(TrainLoader(DataConfig(sources=[SourceConfig("text", all_bad)]), tok, model_cfg)))


def test_overlong_policy_truncates_outside_images_or_drops(tok, model_cfg, data_dir):
    long_text = {"text": " ".join(["one two three"] * 100)}
    img = {"images": [data_dir / "img3.png"], "messages": [
        {"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "A long answer " * 30}]}
    full = Renderer(DataConfig(seq_len=100_000), tok, model_cfg)(img)
    n_ctx = full.input_ids.index(tok.img_end_id) + 1  # tokens up to the end of the image block
    t = Renderer(DataConfig(seq_len=n_ctx + 20, overlong="truncate"), tok, model_cfg)
    s = t(img)
    assert len(s) == n_ctx + 20 and s.truncated and s.input_ids == full.input_ids[: n_ctx + 20]
    assert torch.equal(s.pixel_values, full.pixel_values)
    assert len(t(long_text)) == n_ctx + 20
    with pytest.raises(ValueError, match="inside an image"):
        Renderer(DataConfig(seq_len=n_ctx - 3), tok, model_cfg)(img)
    with pytest.raises(ValueError, match="seq_len"):
        Renderer(DataConfig(seq_len=n_ctx + 20, overlong="drop"), tok, model_cfg)(img)


def test_packer_first_fit_and_positions(tok):
    def sample(n):
        return Sample(list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1)))
    p = Packer(rows=2, seq_len=10, pack=True)
    assert all(p.add(sample(n)) for n in (6, 5, 3, 4)) and not p.add(sample(5))
    batch = p.take(pad_id=0)
    assert batch["input_pos"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]  # 6 + 3, padding run
    assert batch["input_pos"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]  # 5 + 4
    assert batch["labels"][0, -1] == IGNORE and batch["input_ids"][0, -1] == 0
    assert batch["num_samples"] == 4 and batch["num_loss_tokens"] == 5 + 4 + 2 + 3
    unpacked = collate([[sample(3)], [sample(5)]], None, pad_id=0)
    assert unpacked["input_ids"].shape == (2, 5)


def test_packed_loss_equals_unpacked_loss(tok, model_cfg, data_dir):
    model = new_model(model_cfg, seed=1).double()
    cfg = DataConfig(seq_len=4096, system="Hi.")
    render_ = Renderer(cfg, tok, model_cfg)
    conv = SourceConfig("conversations", str(data_dir / "conv.jsonl"))
    samples = [render_(_parse(conv, raw, "")) for _, raw in _items(conv, 0, 1)]
    samples.append(render_({"text": "Yes. No. The large star is purple."}))
    total = sum(len(s) for s in samples)
    packer = Packer(rows=2, seq_len=(total + 1) // 2 + max(len(s) for s in samples), pack=True)
    assert all(packer.add(s) for s in samples)
    batch = packer.take(tok.pad_id)
    assert batch["input_ids"].shape[0] == 2 and batch["num_samples"] == 4
    pv = batch["pixel_values"].double()
    with torch.no_grad():
        logits = model(batch["input_ids"], pv, input_pos=batch["input_pos"])
        packed = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
        separate = 0.0
        for s in samples:
            pvs = s.pixel_values.double() if s.pixel_values is not None else None
            out = model(torch.tensor([s.input_ids]), pvs)
            separate += F.cross_entropy(out[0, :-1], torch.tensor(s.labels[1:]), reduction="sum")
    assert batch["num_loss_tokens"] == sum(s.num_loss_tokens for s in samples)
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)


def test_sharding_partitions_lines_and_shards(data_dir):
    src = SourceConfig("text", str(data_dir / "text.jsonl"))
    shares = [[w for w, _ in _items(src, k, 4)] for k in range(4)]
    flat = sorted(w for share in shares for w in share)
    assert len(flat) == 6 and len(set(flat)) == 6 and shares[1] == [f"{src.path}:2", f"{src.path}:6"]
    for j in range(2):
        _tar(data_dir / f"s{j}.tar", [(f"k{j}{i}.txt", b"x") for i in range(3)])
    wds = SourceConfig("webdataset", str(data_dir))
    by_shard = [[w.rsplit(":", 1)[1] for w, _ in _items(wds, k, 2)] for k in range(2)]
    assert by_shard == [["k00", "k01", "k02"], ["k10", "k11", "k12"]]  # whole shards per worker
    by_sample = [[w.rsplit(":", 1)[1] for w, _ in _items(wds, k, 3)] for k in range(3)]
    assert by_sample[0] == ["k00", "k10"] and sum(map(len, by_sample)) == 6  # fewer shards than workers


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "input_pos")) and (
        (a["pixel_values"] is None and b["pixel_values"] is None) or torch.equal(a["pixel_values"], b["pixel_values"]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_same_next_batches(num_workers, tok, model_cfg, data_dir):
    sources = [SourceConfig("text", str(data_dir / "text.jsonl"), weight=2.0),
               SourceConfig("pairs", str(data_dir / "pairs.jsonl"))]
    if num_workers == 0:
        sources.append(SourceConfig("conversations", str(data_dir / "conv.jsonl")))
    cfg = DataConfig(sources=sources, seq_len=200, micro_batch=2, seed=7, num_workers=num_workers, system="Hi.",
                     max_tiles=2)
    first = TrainLoader(cfg, tok, model_cfg)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpointable plain structure
    expected = [next(it) for _ in range(4)]
    resumed = TrainLoader(cfg, tok, model_cfg)
    resumed.load_state_dict(state)
    got = [b for b, _ in zip(resumed, range(4))]
    assert all(_same(a, b) for a, b in zip(expected, got))
    other = TrainLoader(cfg, tok, model_cfg, rank=1, world_size=2)
    with pytest.raises(ValueError, match="same rank, world size and number of workers"):
        other.load_state_dict(state)
    fresh = [b for b, _ in zip(TrainLoader(cfg, tok, model_cfg), range(4))]
    assert not all(_same(a, b) for a, b in zip(expected, fresh))
