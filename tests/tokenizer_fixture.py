"""A small SentencePiece tokenizer folder in the released Mono-InternVL (InternLM2 + InternVL) format.

`make_sp_tokenizer_dir(path)` trains a BPE SentencePiece model with byte fallback on an in-memory text
(deterministic, ~0.1 s) and writes `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`
and `added_tokens.json` like the release: `<unk>` 0, `<s>` 1, `</s>` 2; the six InternLM2 chat specials as
the last pieces of the SentencePiece vocabulary (user-defined pieces named `[UNUSED_TOKEN_141..146]`,
as in older InternLM2 files; their names come from `added_tokens_decoder`); then the nine InternVL tokens
as added tokens right after the SentencePiece vocabulary. Independent of `monovl.tokenizer` on purpose.
"""

import io
import json
import struct
from pathlib import Path

import sentencepiece as spm

CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

_WORDS = (
    "the a an image picture photo of with and in on is are shows there two three cat dog person people "
    "red green blue small large left right top bottom describe what where how many please answer question "
    "text document chart table model visual expert token tile system user assistant hello world"
).split()
_CHINESE = "你好世界图片中有一只猫和两条狗请描述这张的内容是什么书生多模态大模型上海人工智能实验室"


def corpus() -> list[str]:
    """A few KB of deterministic English, Chinese, digits and code-like lines."""
    lines = []
    for i in range(240):
        words = [_WORDS[(i * 7 + k * 13) % len(_WORDS)] for k in range(6 + i % 5)]
        lines.append(" ".join(words).capitalize() + ("?" if i % 3 == 0 else "."))
        lines.append(_CHINESE[i % 17 : i % 17 + 8 + i % 9] + "。")
        lines.append(f"    value_{i % 13} = compute({i}, {i * 37 % 1000})  # step {i % 7}")
    return lines


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _user_defined_piece(piece: str) -> bytes:
    """One serialized `ModelProto.pieces` entry: SentencePiece{piece, score 0.0, type USER_DEFINED (4)}."""
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x04"
    return b"\x0a" + _varint(len(body)) + body  # repeated fields may be appended to a serialized message


def make_sp_tokenizer_dir(path, vocab_size: int = 400, add_dummy_prefix: bool = True) -> None:
    """Write the tokenizer files into `path`; the SentencePiece model has `vocab_size` pieces (chat specials too)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=vocab_size - len(CHAT_TOKENS),
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    n_trained = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    proto += b"".join(_user_defined_piece(f"[UNUSED_TOKEN_{141 + k}]") for k in range(len(CHAT_TOKENS)))
    n_sp = n_trained + len(CHAT_TOKENS)

    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids |= {t: n_trained + k for k, t in enumerate(CHAT_TOKENS)}
    ids |= {t: n_sp + k for k, t in enumerate(INTERNVL_TOKENS)}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    additional = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in ids.items()},
        "additional_special_tokens": additional,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    token = {k: v for k, v in flags.items() if k != "special"}
    special_map = {
        "additional_special_tokens": additional,
        "bos_token": {"content": "<s>", **token},
        "eos_token": {"content": "</s>", **token},
        "pad_token": {"content": "</s>", **token},
        "unk_token": {"content": "<unk>", **token},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(proto)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    added = json.dumps({t: ids[t] for t in INTERNVL_TOKENS}, indent=2)
    (path / "added_tokens.json").write_text(added, encoding="utf-8")
