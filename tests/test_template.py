import pytest

from monovl.template import (
    DEFAULT_SYSTEM_MESSAGE,
    Turn,
    build_query,
    expand_images,
    extract_answer,
    render,
)

SYS = f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>"
GEN = "<|im_start|>assistant\n"


def block(n: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * n + "</img>"


def test_default_system_message_is_the_official_one():
    assert DEFAULT_SYSTEM_MESSAGE == (
        "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    )


def test_text_only():
    assert build_query("Hello, who are you?") == SYS + "<|im_start|>user\nHello, who are you?<|im_end|>" + GEN


def test_one_image_small_and_real_token_count():
    got = build_query("Describe the image.", [2], num_image_token=3)
    assert got == SYS + f"<|im_start|>user\n{block(6)}\nDescribe the image.<|im_end|>" + GEN
    real = build_query("Describe the image.", [2])
    assert real == SYS + f"<|im_start|>user\n{block(512)}\nDescribe the image.<|im_end|>" + GEN
    assert real.count("<IMG_CONTEXT>") == 512


def test_several_images_are_numbered():
    got = build_query("Compare them.", [1, 2], num_image_token=2)
    user = f"<image 1> (图1):{block(2)}<image 2> (图2):{block(4)}\nCompare them."
    assert got == SYS + f"<|im_start|>user\n{user}<|im_end|>" + GEN


def test_explicit_placeholders_are_kept_in_place():
    got = build_query("First <image> then <image>?", [1, 3], num_image_token=1)
    assert got == SYS + f"<|im_start|>user\nFirst {block(1)} then {block(3)}?<|im_end|>" + GEN


def test_history_with_an_image_in_an_earlier_turn():
    history = [Turn("<image>\nDescribe it.", "A cat.", (2,)), ("Its color?", "Black.")]
    got = build_query("And its size?", [], history=history, num_image_token=1)
    assert got == (
        SYS
        + f"<|im_start|>user\n{block(2)}\nDescribe it.<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
        + "<|im_start|>user\nIts color?<|im_end|><|im_start|>assistant\nBlack.<|im_end|>"
        + "<|im_start|>user\nAnd its size?<|im_end|>"
        + GEN
    )
    # History questions may also arrive already expanded; a new image in a later turn gets its placeholder.
    got = build_query("And this one?", [1], history=[(f"{block(1)}\nA?", "B.")], num_image_token=1)
    assert got == (
        SYS + f"<|im_start|>user\n{block(1)}\nA?<|im_end|><|im_start|>assistant\nB.<|im_end|>"
        + f"<|im_start|>user\n{block(1)}\nAnd this one?<|im_end|>" + GEN
    )


def test_system_override_and_empty_system():
    assert build_query("Hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|>" + GEN
    )
    # The official MPT-style template still writes the system block when the message is empty.
    assert build_query("Hi", system="") == "<|im_start|>system\n<|im_end|><|im_start|>user\nHi<|im_end|>" + GEN


def test_render_messages():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert render(messages) == SYS + "<|im_start|>user\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
    assert render([{"role": "system", "content": "S"}, *messages[:1]]) == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nQ<|im_end|>" + GEN
    )
    assert render([*messages[:1], {"role": "assistant", "content": ""}]) == (
        SYS + "<|im_start|>user\nQ<|im_end|>" + GEN
    )
    with pytest.raises(ValueError, match="role"):
        render([{"role": "tool", "content": "x"}])


def test_placeholder_count_mismatch():
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        expand_images("<image> and <image>", [1], 4)
    with pytest.raises(ValueError):
        build_query("<image>\nWhat?", [1, 1])
    with pytest.raises(ValueError):
        build_query("What?", [], history=[Turn("<image>\nOld", "A.")])


def test_extract_answer():
    assert extract_answer("  A black cat. \n<|im_end|><|im_start|>user") == "A black cat."
    assert extract_answer("no end marker ") == "no end marker"
