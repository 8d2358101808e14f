"""Tokenizer of a checkpoint folder: SentencePiece `tokenizer.model` + added tokens, or a `tokenizer.json`.

The SentencePiece path is the official slow `InternLM2Tokenizer` called through transformers
(`tokenizer(text).input_ids`): cut the text at every added or special token (leftmost, longest), let each
token's `lstrip`/`rstrip`/`single_word` trim or merge its neighbours, drop empty chunks, `sp.encode` every
other chunk on its own (the model's normalizer, e.g. a dummy prefix, applies per chunk), prepend BOS when
`add_bos_token`. Decoding joins `sp.decode` of the runs between kept added tokens (skipped specials do not
break a run); unlike transformers, no spaces are inserted around kept added tokens. InternLM2's chat
specials are pieces at the end of the SentencePiece vocabulary (named `[UNUSED_TOKEN_141..146]` in older
files); their names come from `added_tokens_decoder`.
"""

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from monovl.template import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
# End-of-turn tokens of other families' chat templates (Llama 3, Qwen base models), stop ids where they exist.
OTHER_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# InternLM2's chat specials in id order (92538..92543) and the InternVL tokens (92544..92552).
INTERNLM2_CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", IM_END, IM_START)
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    special: bool = False


def _content(token) -> str | None:
    return token["content"] if isinstance(token, dict) else token


def _chat_template(config: dict, jinja: bytes | None) -> str | None:
    """`chat_template` of the config (a string, or a list of named templates: "default"), else the .jinja file."""
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source if source is not None else (jinja.decode("utf-8") if jinja is not None else None)


class Tokenizer:
    """Encode/decode with the files of a tokenizer folder (`files`: file name -> bytes, kept for `save`).

    Attributes read from the files: `bos_id`, `eos_id`, `pad_id` (EOS when no pad token is named),
    `vocab_size` (added tokens included), `stop_token_ids`, `chat_template` (the Jinja2 source from
    `tokenizer_config.json` or `chat_template.jinja`; None without one) and `special_tokens` (name → string).
    """

    def __init__(self, files: dict[str, bytes]):
        self._files = dict(files)
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
        special_map = {**config, **json.loads(files.get("special_tokens_map.json", b"{}"))}
        self._add_bos, self._add_eos = config.get("add_bos_token"), config.get("add_eos_token", False)
        self._sp, self._hf = None, None
        if "tokenizer.json" in files:
            self._hf = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
            self._hf_literal = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
            self._hf_literal.encode_special_tokens = True  # the library's own "specials stay text" mode
        else:
            self._sp = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])

        added: dict[str, AddedToken] = {}
        if self._hf is not None:
            for i, t in self._hf.get_added_tokens_decoder().items():
                added[t.content] = AddedToken(t.content, i, t.lstrip, t.rstrip, t.single_word, t.special)
        for key, d in config.get("added_tokens_decoder", {}).items():
            flags = {k: bool(d.get(k, False)) for k in ("lstrip", "rstrip", "single_word", "special")}
            added.setdefault(d["content"], AddedToken(d["content"], int(key), **flags))
        for content, i in json.loads(files.get("added_tokens.json", b"{}")).items():
            added.setdefault(content, AddedToken(content, int(i)))
        named = {k: _content(special_map.get(k)) for k in SPECIAL_KEYS}
        specials = {*named.values(), *map(_content, special_map.get("additional_special_tokens", []))} - {None}
        for name in specials:  # special tokens are split off and skipped too, wherever their id comes from
            if name in added:
                added[name] = replace(added[name], special=True)
            elif (i := self._model_token_to_id(name)) is not None:
                added[name] = AddedToken(name, i, special=True)
        for t in added.values():
            if self._hf is not None and self._hf.token_to_id(t.content) != t.id:
                raise ValueError(f"tokenizer files disagree: {t.content!r} is {t.id} in the config only")
        self._added = added
        self._added_by_id = {t.id: t for t in added.values()}
        names = sorted(added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

        ids = {k: added[n].id if n in added else None for k, n in named.items()}
        self.bos_id: int | None = ids["bos_token"]
        self.eos_id: int | None = ids["eos_token"]
        self.pad_id: int | None = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        stops = [self.eos_id, self.token_to_id(IM_START), self.token_to_id(IM_END)]
        stops += [self.token_to_id(t) for t in OTHER_STOP_TOKENS]
        # The official `internlm2-chat` stop ids (EOS, <|im_start|>, <|im_end|>), then other families' (those present).
        self.stop_token_ids: list[int] = list(dict.fromkeys(i for i in stops if i is not None))
        self.special_tokens = {k: n for k, n in named.items() if n is not None}
        self.chat_template: str | None = _chat_template(config, files.get("chat_template.jinja"))
        if self._hf is not None:
            self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)
        else:
            self.vocab_size = max([self._sp.get_piece_size(), *(i + 1 for i in self._added_by_id)])

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load `tokenizer.json` (+ optional configs), else `tokenizer.model` + `tokenizer_config.json` (+ others)."""
        path = Path(path)
        expected = "tokenizer.json, or tokenizer.model with tokenizer_config.json"
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {path} does not exist (expected {expected})")
        names = ("tokenizer.json", "tokenizer.model", *CONFIG_FILES)
        files = {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
        if "tokenizer.json" not in files and not {"tokenizer.model", "tokenizer_config.json"} <= files.keys():
            raise FileNotFoundError(f"no tokenizer in {path}: expected {expected}; found {sorted(files) or 'none'}")
        try:
            return cls(files)
        except Exception as e:  # malformed files; `tokenizers` raises a plain Exception
            raise ValueError(f"cannot load the tokenizer files in {path}: {e}") from e

    def save(self, path) -> None:
        """Write the files this tokenizer was loaded from into folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (path / name).write_bytes(data)

    def _model_token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def token_to_id(self, token: str) -> int | None:
        t = self._added.get(token)
        return t.id if t is not None else self._model_token_to_id(token)

    def id_to_token(self, i: int) -> str:
        if i in self._added_by_id:
            return self._added_by_id[i].content
        if self._hf is not None and (token := self._hf.id_to_token(i)) is not None:
            return token
        if self._sp is not None and 0 <= i < self._sp.get_piece_size():
            return self._sp.id_to_piece(i)
        raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")

    def _require(self, token: str) -> int:
        if (i := self.token_to_id(token)) is None:
            raise ValueError(f"this tokenizer has no {token} token")
        return i

    @property
    def img_context_id(self) -> int:
        return self._require(IMG_CONTEXT)

    @property
    def img_start_id(self) -> int:
        return self._require(IMG_START)

    @property
    def img_end_id(self) -> int:
        return self._require(IMG_END)

    # ---- encode / decode ----
    def encode(self, text: str | Sequence[tuple[str, bool]], add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS when `add_bos` (default: the files' `add_bos_token`, else True).

        `text` is a string, in which every added or special token is a token (raw), or a list of (text,
        control) segments (`monovl.template.render_segments`): then a token is a token only inside a control
        segment, and one typed in the other segments (users' text) is encoded as plain text.
        """
        if not isinstance(text, str):
            return self._encode_segments(text, add_bos)
        if self._hf is not None and add_bos is None and self._add_bos is None:
            return self._hf.encode(text, add_special_tokens=True).ids  # the tokenizer.json post-processor
        ids = self._hf.encode(text, add_special_tokens=False).ids if self._hf is not None else self._encode_sp(text)
        return self._wrap(ids, add_bos)

    def _wrap(self, ids: list[int], add_bos: bool | None) -> list[int]:
        add_bos = add_bos if add_bos is not None else self._add_bos is not False
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []  # Qwen has no BOS token
        return bos + ids + ([self.eos_id] if self._add_eos else [])

    def _encode_segments(self, segments: Sequence[tuple[str, bool]], add_bos: bool | None) -> list[int]:
        text, control, at = "", [], 0
        for piece, is_control in segments:
            if is_control:
                control.append((at, at + len(piece)))
            text, at = text + piece, at + len(piece)
        pieces = self._pieces(text, control)
        if self._hf is None:
            return self._wrap(self._ids_sp(pieces), add_bos)
        encodings = [(self._hf if is_token else self._hf_literal).encode(chunk, add_special_tokens=False)
                     for chunk, is_token in pieces if chunk]
        merged = tokenizers.Encoding.merge(encodings, growing_offsets=True) if encodings else None
        if add_bos is None and self._add_bos is None:  # the tokenizer.json post-processor, as `encode`
            return self._hf.post_process(merged or self._hf.encode("", add_special_tokens=False)).ids
        return self._wrap(merged.ids if merged else [], add_bos)

    def _encode_sp(self, text: str) -> list[int]:
        return self._ids_sp(self._pieces(text))

    def _pieces(self, text: str, control: Sequence[tuple[int, int]] | None = None) -> list[tuple[str, bool]]:
        """`text` cut at every added token (leftmost, longest; with `control`, only at those inside one of its
        (start, end) spans) as (chunk, is_token) pairs, each token's lstrip/rstrip/single_word applied to its
        neighbours, as transformers' PreTrainedTokenizer.tokenize does."""
        chunks, at = [], 0
        for m in self._split_re.finditer(text) if self._split_re else ():
            if control is None or any(a <= m.start() and m.end() <= b for a, b in control):
                chunks += [[text[at : m.start()], False], [m.group(), True]]
                at = m.end()
        chunks = [c for c in chunks + [[text[at:], False]] if c[0]]
        for i, (chunk, is_token) in enumerate(chunks):
            if not is_token:
                continue
            token = self._added[chunk]
            left = chunks[i - 1][0] if i > 0 else None
            right = chunks[i + 1][0] if i + 1 < len(chunks) else None
            if token.rstrip and right:
                chunks[i + 1][0] = right.lstrip()
            if token.lstrip and left:
                chunks[i - 1][0] = left.rstrip()
            if token.single_word and left and left[-1] != " ":  # merged into the text next to it
                chunks[i - 1][0], chunks[i] = chunks[i - 1][0] + chunk, ["", False]
            elif token.single_word and right and right[0] != " ":
                chunks[i], chunks[i + 1][0] = ["", False], chunk + chunks[i + 1][0]
        return [(chunk, is_token) for chunk, is_token in chunks]

    def _ids_sp(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        ids = []
        for chunk, is_token in pieces:
            if is_token:
                ids.append(self._added[chunk].id)
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        out, run = [], []
        for i in ids:
            token = self._added_by_id.get(i)
            if token is None:
                run.append(i)
            elif not (skip_special_tokens and token.special):
                out += [self._sp.decode(run), token.content]
                run = []
        return "".join(out) + self._sp.decode(run)


class StreamDecoder:
    """Incremental decoding: `put(id)` returns only newly completed text, never a partial character.

    Each step decodes a short window of ids (the last emitted ones plus the new ones) so that leading-space
    handling matches a full decode, and holds text back while it ends in U+FFFD (an unfinished UTF-8
    sequence). `flush()` returns whatever is still held back at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = self._read = 0  # window start; end of the ids already emitted

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        done = decode(self.ids[self._prefix : self._read], skip_special_tokens=skip)
        text = decode(self.ids[self._prefix :], skip_special_tokens=skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir) -> Tokenizer:
    """Train a byte-level BPE on `texts` with InternLM2's layout of specials; write it to `out_dir` and load it.

    Ids: `<unk>` 0, `<s>` 1, `</s>` 2, learned tokens, then the six InternLM2 chat specials closing the first
    `vocab_size` ids, then the nine InternVL tokens. A corpus too small for `vocab_size` gives fewer learned
    tokens (the specials follow them). Decoding round-trips the text; " word" keeps its space in one token.
    """
    core = ["<unk>", "<s>", "</s>"]
    if vocab_size < 256 + len(core) + len(INTERNLM2_CHAT_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE with InternLM2's specials")
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(INTERNLM2_CHAT_TOKENS),
        special_tokens=core,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(list(texts), trainer)
    if hf.get_vocab_size() < vocab_size - len(INTERNLM2_CHAT_TOKENS):
        logger.warning("corpus too small: %d learned tokens for vocab_size %d", hf.get_vocab_size(), vocab_size)
    specials = INTERNLM2_CHAT_TOKENS + INTERNVL_TOKENS
    hf.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in specials])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])

    ids = {t: hf.token_to_id(t) for t in core + list(specials)}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    special_map = {"additional_special_tokens": list(reversed(INTERNLM2_CHAT_TOKENS)), "bos_token": "<s>",
                   "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}  # as InternLM2's files
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in ids.items()},
              "tokenizer_class": "PreTrainedTokenizerFast", **special_map}
    files = {
        "tokenizer.json": hf.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
        "added_tokens.json": json.dumps({t: ids[t] for t in INTERNVL_TOKENS}, indent=2),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text + "\n", encoding="utf-8")
    return Tokenizer.from_dir(out_dir)
