"""Training samples: rendering with the inference template, and greedy first-fit packing into rows.

`Renderer` turns a parsed item into token ids and labels with the inference template, tokenizer and
tiling: loss falls on each assistant answer and its closing `<|im_end|>` (with a tokenizer's own chat template,
Qwen/Llama: on what the template adds for the answer), and on every token of pure text after BOS; over-long
samples are truncated at `seq_len` (dropped when the cut splits an image) or dropped.

A batch row holds whole samples one after another; `input_pos` restarts at 0 at every sample, which the
model (without a KV cache) turns into a block-diagonal causal mask, so packed samples stay independent.
Padding at the end of a row is one more run of positions from 0 with labels -100.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import torch

from monovl import chat_template
from monovl.config import TOKENIZER_TEMPLATE
from monovl.images import ImageError
from monovl.inputs import image_tiles
from monovl.template import IM_END, IM_START, IMAGE_PLACEHOLDER, add_image_placeholders, expand_images, render
from monovl.train.data_config import DataConfig

IGNORE = -100  # label of a token that carries no loss


@dataclass
class Sample:
    """One rendered sample: token ids, labels (the id where loss applies, else IGNORE), image tiles."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S), tiles of its images in placeholder order
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


class BadSample(ValueError):
    """An item that cannot be used; `reason` is its DataStats key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Renderer:
    """Parsed items → `Sample`s with the inference template, tokenizer and tiling."""

    def __init__(self, cfg: DataConfig, tokenizer, model_cfg):
        self.cfg, self.tok, self.model_cfg = cfg, tokenizer, model_cfg
        self.header = tokenizer.encode("assistant\n", add_bos=False)

    def __call__(self, item: dict) -> Sample:
        if "text" in item or "segments" in item:  # each segment encoded on its own; a plain text is one, all loss
            ids, labels = [], []
            for i, (text, with_loss) in enumerate(item["segments"] if "segments" in item else [(item["text"], True)]):
                part = self.tok.encode(text, add_bos=i == 0)
                ids, labels = ids + part, labels + (part if with_loss else [IGNORE] * len(part))
            ids, labels = ids + [self.tok.eos_id], labels + [self.tok.eos_id]
            labels[0] = IGNORE  # nothing in the sample predicts its first token (in a packed row, the previous one would)
            return self._fit(Sample(ids, labels))
        messages, system = list(item["messages"]), self.cfg.system
        if messages and messages[0]["role"] == "system":
            system = system if system is not None else messages[0]["content"]
            messages = messages[1:]
        while messages and messages[-1]["role"] == "user":
            messages.pop()  # a trailing question without an answer teaches nothing
        if not any(m["role"] == "assistant" for m in messages):
            raise BadSample("no_answer", "the conversation has no assistant answer")
        n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
        if n_placeholders == 0 and item["images"]:
            first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first is None:
                raise BadSample("image_mismatch", "images but no user turn to place them in")
            messages[first] = {"role": "user", "content": add_image_placeholders(messages[first]["content"],
                                                                                   len(item["images"]))}
        elif n_placeholders != len(item["images"]):
            raise BadSample("image_mismatch", f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                                              f"{len(item['images'])} images")
        pixels = [self._load(image) for image in item["images"]]
        tiles = iter([len(p) for p in pixels])
        for i, m in enumerate(messages):
            if m["role"] == "user":  # an answer's literal `<image>` stays text
                k = m["content"].count(IMAGE_PLACEHOLDER)
                messages[i] = {"role": "user", "content": expand_images(m["content"], list(islice(tiles, k)),
                                                                        self.model_cfg.num_image_token)}
        if self.model_cfg.template == TOKENIZER_TEMPLATE:
            ids, labels = self._encode_chat(messages, system)
        else:
            ids, labels = self._encode(render(messages, system=system))
        return self._fit(Sample(ids, labels, torch.cat(pixels) if pixels else None))

    def _load(self, image) -> torch.Tensor:
        if self.model_cfg.vision is None:
            raise BadSample("image_on_text_model", "an image sample for a text-only model")
        try:
            return image_tiles(self.model_cfg, image, self.cfg.max_tiles)
        except ImageError as e:
            raise BadSample("bad_image", str(e)) from e

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        """Encode in segments cut right after each assistant turn's `<|im_start|>` and after its `<|im_end|>`
        (both added tokens, where the tokenizer splits anyway); label an assistant segment past its header."""
        marker = IM_START + "assistant\n"
        ids, labels, start = [], [], 0
        while (at := text.find(marker, start)) >= 0:
            head = text[start:at + len(IM_START)]
            end = text.find(IM_END, at)
            end = len(text) if end < 0 else end + len(IM_END)
            body = self.tok.encode(text[at + len(IM_START):end], add_bos=False)
            head_ids = self.tok.encode(head, add_bos=not ids)
            n = next((i for i, (a, b) in enumerate(zip(body, self.header)) if a != b), min(len(body), len(self.header)))
            ids += head_ids + body
            labels += [IGNORE] * (len(head_ids) + n) + body[n:]
            start = end
        tail = self.tok.encode(text[start:], add_bos=not ids) if start < len(text) else []
        return ids + tail, labels + [IGNORE] * len(tail)

    def _encode_chat(self, messages: list[dict], system: str | None) -> tuple[list[int], list[int]]:
        """The tokenizer's own chat template (Qwen, Llama): each assistant turn is what rendering up to it adds to
        the rendering of the turns before it with the generation prompt; its tokens carry the loss."""
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        source, tokens = self.tok.chat_template, self.tok.special_tokens
        ids, labels, done = [], [], ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = chat_template.render(source, messages[:k], add_generation_prompt=True, tokens=tokens)
            full = chat_template.render(source, messages[: k + 1], add_generation_prompt=False, tokens=tokens)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise BadSample("template", "the chat template renders earlier turns differently once an answer "
                                            "follows; cannot mark the answer tokens")
            head = self.tok.encode(prompt[len(done):], add_bos=False)
            body = self.tok.encode(full[len(prompt):], add_bos=False)
            ids, labels, done = ids + head + body, labels + [IGNORE] * len(head) + body, full
        return ids, labels

    def _fit(self, s: Sample) -> Sample:
        """Apply the overlong policy: "drop", or "truncate" at seq_len (dropped when the cut splits an image)."""
        cut = self.cfg.seq_len
        if len(s) <= cut:
            return s
        if self.cfg.overlong == "drop":
            raise BadSample("overlong", f"{len(s)} tokens > seq_len {cut}")
        kept = s.input_ids[:cut]
        if s.pixel_values is not None and kept.count(self.tok.img_start_id) != kept.count(self.tok.img_end_id):
            raise BadSample("overlong", f"{len(s)} tokens > seq_len {cut} and the cut falls inside an image")
        n_tiles = 0 if s.pixel_values is None else kept.count(self.tok.img_context_id) // self.model_cfg.num_image_token
        out = Sample(kept, s.labels[:cut], s.pixel_values[:n_tiles] if n_tiles else None, truncated=True)
        if out.num_loss_tokens == 0:
            raise BadSample("overlong", f"{len(s)} tokens > seq_len {cut}; the truncated sample has no loss tokens")
        return out


class Packer:
    """Fill `rows` rows of `seq_len` tokens; `pack=False` puts one sample per row.

    `add(sample)` places the sample in the first row with room (first fit) and returns True, or returns
    False when no row has room: the batch is then full and the caller emits it and starts a new one.
    """

    def __init__(self, rows: int, seq_len: int, pack: bool = True):
        if rows < 1 or seq_len < 2:
            raise ValueError(f"need rows >= 1 and seq_len >= 2, got {rows}, {seq_len}")
        self.rows, self.seq_len, self.pack = rows, seq_len, pack
        self.batch: list[list[Sample]] = [[] for _ in range(rows)]
        self._used = [0] * rows

    def add(self, sample: Sample) -> bool:
        if len(sample) > self.seq_len:
            raise ValueError(f"sample of {len(sample)} tokens exceeds seq_len={self.seq_len}")
        for r in range(self.rows):
            empty = not self.batch[r]
            if (empty or self.pack) and self._used[r] + len(sample) <= self.seq_len:
                self.batch[r].append(sample)
                self._used[r] += len(sample)
                return True
        return False

    def __len__(self) -> int:
        return sum(len(row) for row in self.batch)

    def take(self, pad_id: int) -> dict:
        """The collated batch (see `collate`); the packer is empty afterwards."""
        rows, self.batch, self._used = self.batch, [[] for _ in range(self.rows)], [0] * self.rows
        return collate(rows, self.seq_len if self.pack else None, pad_id)


def collate(rows: list[list[Sample]], seq_len: int | None, pad_id: int) -> dict:
    """Rows of samples → a training batch; `seq_len` None pads to the longest row.

    Keys: input_ids, labels, input_pos (B, T) long; pixel_values (N, 3, S, S) or None, the tiles of all
    images in the order their blocks appear (row-major); num_samples, num_loss_tokens, num_tokens.
    """
    rows = [row for row in rows if row] or [[]]
    width = seq_len or max(sum(len(s) for s in row) for row in rows)
    ids, labels, pos, tiles = [], [], [], []
    for row in rows:
        r_ids, r_labels, r_pos = [], [], []
        for s in row:
            if s.labels and s.labels[0] != IGNORE:
                raise ValueError("the first token of a sample must not carry a label (it has no predecessor)")
            r_ids += s.input_ids
            r_labels += s.labels
            r_pos += range(len(s))
            if s.pixel_values is not None:
                tiles.append(s.pixel_values)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))  # padding: its own run of positions from 0
    labels_t = torch.tensor(labels, dtype=torch.long)  # (B, T)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),  # (B, T)
        "labels": labels_t,
        "input_pos": torch.tensor(pos, dtype=torch.long),  # (B, T)
        "pixel_values": torch.cat(tiles) if tiles else None,  # (N, 3, S, S)
        "num_samples": sum(len(row) for row in rows),
        "num_loss_tokens": int((labels_t != IGNORE).sum()),
        "num_tokens": sum(len(s) for row in rows for s in row),
    }
