import json

import pytest
import sentencepiece as spm
from tokenizer_fixture import CHAT_TOKENS, INTERNVL_TOKENS, corpus, make_sp_tokenizer_dir

from monovl.template import DEFAULT_SYSTEM_MESSAGE, build_query
from monovl.tokenizer import StreamDecoder, Tokenizer, build_bpe_tokenizer


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def sp_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    make_sp_tokenizer_dir(path, add_dummy_prefix=request.param)
    return path


@pytest.fixture(scope="module")
def tok(sp_dir):
    return Tokenizer.from_dir(sp_dir)


@pytest.fixture(scope="module")
def sp(sp_dir):
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def ids(sp_dir):
    """content -> id, read straight from the fixture's files."""
    decoder = json.loads((sp_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {d["content"]: int(i) for i, d in decoder.items()}


def with_config(sp_dir, **changes) -> Tokenizer:
    files = {p.name: p.read_bytes() for p in sp_dir.iterdir()}
    config = json.loads(files["tokenizer_config.json"])
    for content, flags in changes.get("flags", {}).items():
        entry = next(d for d in config["added_tokens_decoder"].values() if d["content"] == content)
        entry.update(flags)
    files["tokenizer_config.json"] = json.dumps(config).encode()
    if "added" in changes:
        files["added_tokens.json"] = json.dumps({**json.loads(files["added_tokens.json"]), **changes["added"]}).encode()
    return Tokenizer(files)


def test_special_ids_come_from_the_files(tok, sp, ids):
    n_sp = sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["<s>"], ids["</s>"], ids["</s>"])
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(n_sp - 6, n_sp))
    assert [tok.token_to_id(t) for t in INTERNVL_TOKENS] == list(range(n_sp, n_sp + 9))
    assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == (ids["<img>"], ids["</img>"], ids["<IMG_CONTEXT>"])
    assert tok.vocab_size == n_sp + 9
    assert tok.stop_token_ids == [ids["</s>"], ids["<|im_start|>"], ids["<|im_end|>"]]
    assert tok.id_to_token(ids["<|im_start|>"]) == "<|im_start|>"  # the config's name, not the sp piece
    assert sp.id_to_piece(ids["<|im_start|>"]) == "[UNUSED_TOKEN_146]"
    assert tok.id_to_token(5) == sp.id_to_piece(5)
    assert tok.token_to_id("no-such-token") is None
    with pytest.raises(IndexError):
        tok.id_to_token(tok.vocab_size)


def test_encode_rendered_prompt_exactly(tok, sp, ids):
    prompt = build_query("What is in the picture?", [2], num_image_token=3)
    ims, ime = ids["<|im_start|>"], ids["<|im_end|>"]
    expected = (
        [ids["<s>"], ims] + sp.encode("system\n" + DEFAULT_SYSTEM_MESSAGE) + [ime, ims] + sp.encode("user\n")
        + [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * 6 + [ids["</img>"]]
        + sp.encode("\nWhat is in the picture?") + [ime, ims] + sp.encode("assistant\n")
    )
    assert tok.encode(prompt) == expected
    assert tok.encode(prompt, add_bos=False) == expected[1:]
    assert tok.encode("") == [ids["<s>"]]


def test_lstrip_rstrip_flags(sp_dir, sp, ids):
    tok = with_config(sp_dir, flags={"<img>": {"lstrip": True}, "<|im_end|>": {"rstrip": True}})
    got = tok.encode("a cat  <img>x <|im_end|> \n dog<|im_end|>   ", add_bos=False)
    expected = sp.encode("a cat") + [ids["<img>"]] + sp.encode("x ") + [ids["<|im_end|>"]] + sp.encode("dog")
    assert got == expected + [ids["<|im_end|>"]]  # the fully stripped tail chunk is dropped
    plain = Tokenizer.from_dir(sp_dir).encode("a cat  <img>x", add_bos=False)
    assert plain == sp.encode("a cat  ") + [ids["<img>"]] + sp.encode("x")


def test_single_word_flag(sp_dir, sp, ids):
    # As transformers: a single_word token touching a non-space character becomes plain text.
    tok = with_config(sp_dir, flags={"<box>": {"single_word": True}})
    assert tok.encode("a <box> b", add_bos=False) == sp.encode("a ") + [ids["<box>"]] + sp.encode(" b")
    assert tok.encode("a<box> b", add_bos=False) == sp.encode("a<box>") + sp.encode(" b")
    assert tok.encode("a <box>b", add_bos=False) == sp.encode("a ") + sp.encode("<box>b")


def test_longest_added_token_wins(sp_dir, tok, ids):
    longer = with_config(sp_dir, added={"<box></box>": tok.vocab_size})
    assert longer.encode("<box></box><box>", add_bos=False) == [tok.vocab_size, ids["<box>"]]
    assert tok.encode("<box></box>", add_bos=False) == [ids["<box>"], ids["</box>"]]


def test_decode(tok, sp, ids):
    text = "Hello  world,\n 你好！ 🙂 x=1"
    assert tok.decode(tok.encode(text)) == text
    with_specials = "<|im_start|>user\n<img><IMG_CONTEXT></img>\n 你好<|im_end|> bye"
    assert tok.decode(tok.encode(with_specials, add_bos=False), skip_special_tokens=False) == with_specials
    hello = sp.encode("hello")
    assert tok.decode([ids["<s>"]] + hello + [ids["<|im_end|>"]]) == "hello"
    assert tok.decode([ids["<s>"]] + hello + [ids["<|im_end|>"]], skip_special_tokens=False) == "<s>hello<|im_end|>"
    # A skipped special token does not break the SentencePiece run (as transformers' slow decode).
    assert tok.decode(hello + [ids["<|im_end|>"]] + sp.encode(" you")) == sp.decode(hello + sp.encode(" you"))


def test_stream_decoder_emits_each_character_once(tok, ids):
    text = "Hi 你好世界 🙂👍🏽 résumé"
    token_ids = tok.encode(text, add_bos=False) + [ids["<|im_end|>"]]
    stream = StreamDecoder(tok)
    pieces = [stream.put(i) for i in token_ids]
    assert "".join(pieces) + stream.flush() == text == tok.decode(token_ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # bytes of an unfinished character were held back
    assert stream.flush() == ""


def test_stream_decoder_flushes_an_unfinished_character(tok):
    stream = StreamDecoder(tok)
    first_bytes = tok.encode("🙂", add_bos=False)[:-1]
    assert "".join(stream.put(i) for i in first_bytes) == ""
    assert stream.flush().endswith("\ufffd")


def test_save_round_trip(tok, sp_dir, tmp_path):
    tok.save(tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (tmp_path / name).read_bytes() == (sp_dir / name).read_bytes()
    assert Tokenizer.from_dir(tmp_path).encode("hi <img>") == tok.encode("hi <img>")


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError):
        Tokenizer.from_dir(tmp_path)


def test_missing_image_token_is_an_error(sp_dir):
    files = {p.name: p.read_bytes() for p in sp_dir.iterdir() if p.name != "added_tokens.json"}
    config = json.loads(files["tokenizer_config.json"])
    decoder = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v["content"] != "<IMG_CONTEXT>"}
    files["tokenizer_config.json"] = json.dumps(config).encode()
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        Tokenizer(files).img_context_id


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return build_bpe_tokenizer(corpus(), 800, tmp_path_factory.mktemp("bpe"))


def test_bpe_layout(bpe):
    assert [bpe.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [bpe.token_to_id(t) for t in CHAT_TOKENS] == list(range(794, 800))
    assert [bpe.token_to_id(t) for t in INTERNVL_TOKENS] == list(range(800, 809))
    assert bpe.vocab_size == 809 and bpe.stop_token_ids == [2, 799, 798]
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.img_context_id) == (1, 2, 2, 802)


def test_bpe_round_trip_and_reload(bpe, tmp_path):
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nDescribe the image 你好 🙂<|im_end|>"
    ids = bpe.encode(text)
    assert ids[:3] == [1, 799, bpe.token_to_id("user")] and 802 in ids
    assert bpe.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert bpe.decode(ids) == "user\n\nDescribe the image 你好 🙂"
    assert len(bpe.encode(" the", add_bos=False)) == 1  # a leading space belongs to the word's token
    bpe.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(text) == ids
    stream = StreamDecoder(bpe)
    assert "".join(stream.put(i) for i in ids) + stream.flush() == bpe.decode(ids)


def test_bpe_is_deterministic(bpe, tmp_path):
    again = build_bpe_tokenizer(corpus(), 800, tmp_path)
    assert again._files == bpe._files
