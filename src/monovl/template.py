"""The `internlm2-chat` prompt template of InternVL / Mono-InternVL, as plain strings.

    <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>...

Facts (InternVL `internvl_chat/internvl/conversation.py`, template `internlm2-chat`, separator style MPT):
the system block is `<|im_start|>system\\n{system_message}` + `<|im_end|>` and is written even when the
system message is empty; a turn is `role + message + <|im_end|>`, or the bare role when the message is
empty (the generation prompt); there is no newline after `<|im_end|>`. An image is
`<img>` + `<IMG_CONTEXT>` x (num_image_token * tiles) + `</img>`, substituted for the k-th `<image>`
placeholder in order (`InternVLChatModel.chat`).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

# The short-answer instructions the InternVL family appends to a question (VLMEvalKit prompts).
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
MC_SUFFIX_CN = "请直接回答选项字母。"
VQA_SUFFIX = "Answer the question using a single word or phrase."
YESNO_SUFFIX = "Please answer yes or no."

# Default system message of the InternVL `internlm2-chat` template (InternVL2 / Mono-InternVL releases).
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

_ROLE_HEADERS = {"user": f"{IM_START}user\n", "assistant": f"{IM_START}assistant\n"}


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation; `num_tiles` has one entry per `<image>` in `question`."""

    question: str
    answer: str
    num_tiles: tuple[int, ...] = ()


Segment = tuple[str, bool]  # (text, control): special tokens are tokens only in control segments


def render(messages: Sequence[dict], system: str | None = None) -> str:
    """Render `{"role": "user"|"assistant", "content": str}` messages as an `internlm2-chat` prompt.

    A leading `{"role": "system"}` message sets the system message unless `system` is given; `None` means
    DEFAULT_SYSTEM_MESSAGE. The generation prompt `<|im_start|>assistant\\n` ends the text when the last
    message is the user's. `<image>` placeholders are left as they are (see `expand_images`).
    """
    return "".join(text for text, _ in render_segments(messages, system))


def render_segments(messages: Sequence[dict], system: str | None = None, num_image_token: int = 256) -> list[Segment]:
    """`render`, cut into (text, control) segments for `Tokenizer.encode`: the template's own text and image
    blocks are control, the messages' text is not, so special tokens a user types stay text (no role
    injection). A message with a `"num_tiles"` list has its `<image>` placeholders expanded into image blocks.
    """
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        if system is None:
            system = messages[0]["content"]
        messages = messages[1:]
    if system is None:
        system = DEFAULT_SYSTEM_MESSAGE
    out = [(f"{IM_START}system\n", True), (system, False), (IM_END, True)]
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in _ROLE_HEADERS:
            raise ValueError(f"unknown role {role!r}: expected 'user' or 'assistant' (or a leading 'system')")
        out.append((_ROLE_HEADERS[role], True))
        if content:  # as the official template: an empty message renders as the bare role header
            out += content_segments(content, message.get("num_tiles"), num_image_token) + [(IM_END, True)]
    if messages and messages[-1]["role"] == "user":
        out.append((_ROLE_HEADERS["assistant"], True))
    return [(text, control) for text, control in out if text]


def content_segments(content: str, num_tiles: Sequence[int] | None, num_image_token: int) -> list[Segment]:
    if num_tiles is None:
        return [(content, False)]
    pieces = content.split(IMAGE_PLACEHOLDER)
    _check_placeholders(len(pieces) - 1, len(num_tiles))
    out = [(pieces[0], False)]
    for tiles, piece in zip(num_tiles, pieces[1:]):
        out += [(image_block(tiles, num_image_token), True), (piece, False)]
    return out


def _check_placeholders(placeholders: int, images: int) -> None:
    if placeholders != images:
        raise ValueError(f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {images} images "
                         "were given")


def image_block(tiles: int, num_image_token: int) -> str:
    """`<img>` + `<IMG_CONTEXT>` x (num_image_token * tiles) + `</img>`."""
    return IMG_START + IMG_CONTEXT * (num_image_token * tiles) + IMG_END


def expand_images(prompt: str, num_tiles: Sequence[int], num_image_token: int) -> str:
    """Replace the k-th `<image>` placeholder by the image block of `num_tiles[k]` tiles."""
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    _check_placeholders(len(pieces) - 1, len(num_tiles))
    out = [pieces[0]]
    for tiles, piece in zip(num_tiles, pieces[1:]):
        out += [image_block(tiles, num_image_token), piece]
    return "".join(out)


def add_image_placeholders(question: str, num_images: int) -> str:
    """Prefix the placeholders a question without `<image>` needs, as the official code does.

    One image: `<image>\n` + question (`InternVLChatModel.chat`). Several images: numbered as the official
    `multi_image_chat` does, `<image 1> (图1):<image><image 2> (图2):<image>` + `\n` + question.
    """
    if num_images == 0 or IMAGE_PLACEHOLDER in question:
        return question
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    return "".join(f"<image {k}> (图{k}):{IMAGE_PLACEHOLDER}" for k in range(1, num_images + 1)) + "\n" + question


def build_query(
    question: str,
    num_tiles_per_image: Sequence[int] = (),
    history: Iterable[Turn | tuple] = (),
    system: str | None = None,
    num_image_token: int = 256,
) -> str:
    """The full prompt for one new user turn, images expanded, ending with the generation prompt.

    `num_tiles_per_image` lists the tiles of each image of this turn. `history` holds earlier turns as
    `Turn`s or `(question, answer)` / `(question, answer, num_tiles)` tuples; each history question keeps
    its own placeholders, expanded with its own `num_tiles` (already expanded blocks pass through).
    Unlike the official `chat`, placeholders are added to the new question even when there is history.
    """
    segments = query_segments(question, num_tiles_per_image, history, system, num_image_token)
    return "".join(text for text, _ in segments)


def query_segments(question: str, num_tiles_per_image: Sequence[int] = (), history: Iterable[Turn | tuple] = (),
                   system: str | None = None, num_image_token: int = 256) -> list[Segment]:
    """`build_query` as (text, control) segments (see `render_segments`): only the template and the image
    blocks are control; already expanded blocks in history questions are text here."""
    return render_segments(query_messages(question, num_tiles_per_image, history), system, num_image_token)


def query_messages(question: str, num_tiles_per_image: Sequence[int] = (),
                   history: Iterable[Turn | tuple] = ()) -> list[dict]:
    """The messages of `history` and one new user turn (placeholders added), each user message with `num_tiles`."""
    messages = []
    for turn in history:
        turn = turn if isinstance(turn, Turn) else Turn(*turn)
        messages.append({"role": "user", "content": turn.question, "num_tiles": turn.num_tiles})
        messages.append({"role": "assistant", "content": turn.answer})
    question = add_image_placeholders(question, len(num_tiles_per_image))
    messages.append({"role": "user", "content": question, "num_tiles": num_tiles_per_image})
    return messages


def extract_answer(generated: str) -> str:
    """The answer in decoded model output: the text before the first `<|im_end|>`, stripped (official)."""
    return generated.split(IM_END)[0].strip()
