"""Tiny tokenizer folders of the Qwen (ChatML) and Llama 3 (header tokens) kinds, with their chat templates.

The templates are written here in each family's format (facts of the format, not copies of released files);
the byte-level BPE is trained on a few sentences, so its vocabulary is small enough for tiny test models.
"""
import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Exercises the rest of the convention: loop controls, `tojson` keeping non-ASCII text, `raise_exception`.
FEATURES_TEMPLATE = """{% for message in messages %}
{% if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message.role) }}{% endif %}
{% if message.role == 'system' %}{% continue %}{% endif %}
{{ message.role | upper }}: {{ message.content | tojson }}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""

FAMILY_TOKENS = {  # family → (special tokens in id order after the learnt ones, bos, eos, chat template)
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE),
}
CORPUS = ["The red square is left of the blue circle.", "What colour is the circle? It is blue.",
          "Hello there, how are you today?", "Count the shapes: one, two, three."] * 4


def write_family_tokenizer(path, kind: str, vocab_size: int = 200) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` (with `chat_template`) of `kind` into `path`."""
    specials, bos, eos, template = FAMILY_TOKENS[kind]
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    hf.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in specials])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": eos,
              "pad_token": specials[0], "bos_token": bos, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(hf.to_str(pretty=True))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path
