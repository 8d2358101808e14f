"""A tokenizer's own chat template (`chat_template` in `tokenizer_config.json`, Jinja2), rendered as Hugging Face does.

The Hugging Face convention: a sandboxed Jinja2 environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, the globals `raise_exception` and
`strftime_now`, and the variables `messages`, `add_generation_prompt` and the special tokens named in the
config (`bos_token`, `eos_token`, …). Qwen2/2.5/3 (ChatML) and Llama 3 (header tokens) ship their templates so.

`render_segments` cuts the rendered prompt into (text, control) segments as `monovl.template.render_segments`
does for `internlm2-chat`: the template's own text and InternVL image blocks are control, message text is not,
so special tokens a user types stay text. It renders each message's text as a unique marker and splits there;
where the result differs from the plain rendering (a template that edits message text), the plain one is used.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from monovl.config import TOKENIZER_TEMPLATE
from monovl.template import Segment, content_segments
from monovl.template import render_segments as internlm2_segments

log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The template called `raise_exception`, or cannot be parsed."""


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the tokenizer's chat_template cannot be parsed: {e}") from None


def render(source: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
           tokens: dict[str, str] | None = None, **extra) -> str:
    """The prompt string of `messages` ({"role", "content"} dicts) as the template renders it; further keywords
    are template variables (e.g. Qwen3's `enable_thinking`)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return _compile(source).render(messages=plain, add_generation_prompt=add_generation_prompt,
                                   **(tokens or {}), **extra)


def render_segments(source: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    tokens: dict[str, str] | None = None, num_image_token: int = 256) -> list[Segment]:
    """`render` as (text, control) segments; a message with a `"num_tiles"` list has its `<image>` placeholders
    expanded into image blocks. A template that edits message text (the marked rendering differs from the plain
    one) gives the plain rendering, all of it control (logged)."""
    want = render(source, _expanded(messages, num_image_token), add_generation_prompt=add_generation_prompt,
                  tokens=tokens)
    markers = [f"\x00msg{i}\x00" for i in range(len(messages))]
    marked = [{"role": m["role"], "content": marker if m["content"] else ""} for m, marker in zip(messages, markers)]
    text = render(source, marked, add_generation_prompt=add_generation_prompt, tokens=tokens)
    pieces = re.split("(\x00msg[0-9]+\x00)", text)
    out: list[Segment] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            out.append((piece, True))
        elif piece in markers:
            message = messages[markers.index(piece)]
            out += content_segments(message["content"], message.get("num_tiles"), num_image_token)
    out = [(t, control) for t, control in out if t]
    if "".join(t for t, _ in out) != want:
        log.warning("the chat template edits message text; special tokens typed in messages are not escaped")
        return [(want, True)]
    return out


def _expanded(messages: Sequence[dict], num_image_token: int) -> list[dict]:
    return [{"role": m["role"], "content": "".join(t for t, _ in content_segments(
        m["content"], m.get("num_tiles"), num_image_token))} for m in messages]


def encode_messages(template: str, tokenizer, messages: Sequence[dict], *, system: str | None = None,
                    num_image_token: int = 256, raw_special_tokens: bool = False) -> list[int]:
    """Token ids of a prompt (ending with the generation prompt) in the model's template: `internlm2-chat`, or
    `TOKENIZER_TEMPLATE` (the tokenizer's own; `system` None: the template's default system message)."""
    if template != TOKENIZER_TEMPLATE:
        segments, add_bos = internlm2_segments(messages, system, num_image_token), None
    else:
        if tokenizer.chat_template is None:
            raise ValueError("the model's config asks for the tokenizer's chat template, but tokenizer_config.json "
                             "has no chat_template")
        if system is not None:
            messages = [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]
        segments = render_segments(tokenizer.chat_template, messages, tokens=tokenizer.special_tokens,
                                   num_image_token=num_image_token)
        add_bos = False  # the template writes BOS itself when its family uses one (as apply_chat_template)
    return tokenizer.encode("".join(t for t, _ in segments) if raw_special_tokens else segments, add_bos=add_bos)
