"""Turn a plain LLM (InternLM2, Qwen2/2.5, Qwen3, Llama) into a Mono-InternVL model ready for stage S1.1.

What is added: the patch embedding (`vision_model.*`) and `mlp1`, initialised randomly (seeded); a visual
FFN expert per layer initialised as an exact copy of the text FFN (and, for EViP++ / v1.5, visual attention
experts copied from the text attention); the nine InternVL tokens in the tokenizer, with their embedding
and output rows set to the mean of the existing tokens' rows. Because experts are copies and routing sends text
tokens only through the text weights, a text-only prompt gives exactly the LLM's logits.

The result keeps the LLM family: InternVL's layout (`InternVLChatModel` whose `llm_config.architectures` names
the family, e.g. `Qwen2ForCausalLM`), the family's parameter names (experts: `mlp_ve.*`, `self_attn_ve.*` beside
`mlp.*`, `self_attn.*`), and its tokenizer's own chat template when it has one (`template = "tokenizer"`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging

import tokenizers
import torch

from monovl.config import TOKENIZER_TEMPLATE, ModelConfig, VisionConfig
from monovl.model import MonoInternVL
from monovl.scratch import init_parameters_
from monovl.tokenizer import INTERNVL_TOKENS, Tokenizer
from monovl.train.recipe import EXPERT_INITS

log = logging.getLogger(__name__)
_FLAGS = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
_LLM_ONLY_FIELDS = ("auto_map", "architectures", "model_type", "torch_dtype", "dtype")  # rewritten on save
_EXPERTS = {".feed_forward_ve.": ".feed_forward.", ".attention_ve.": ".attention.",  # InternLM2
            ".mlp_ve.": ".mlp.", ".self_attn_ve.": ".self_attn."}  # Qwen, Llama
_VOCAB_ROWS = ("tok_embeddings.weight", "output.weight", "embed_tokens.weight", "lm_head.weight")


def _json(files: dict[str, bytes], name: str) -> dict:
    return json.loads(files[name]) if name in files else {}


def add_internvl_tokens(tokenizer: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """The tokenizer with any missing InternVL token added as a special token → (tokenizer, added tokens)."""
    missing = [t for t in INTERNVL_TOKENS if tokenizer.token_to_id(t) is None]
    if not missing:
        return tokenizer, []
    files = dict(tokenizer._files)
    config, added_json = _json(files, "tokenizer_config.json"), _json(files, "added_tokens.json")
    if "tokenizer.json" in files:
        hf = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        hf.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in missing])
        files["tokenizer.json"] = hf.to_str(pretty=True).encode("utf-8")
        ids = {t: hf.token_to_id(t) for t in missing}
    else:
        ids = {t: tokenizer.vocab_size + k for k, t in enumerate(missing)}
    if "tokenizer.json" not in files or "added_tokens.json" in files:
        added_json.update(ids)
        files["added_tokens.json"] = json.dumps(added_json, indent=2, ensure_ascii=False).encode("utf-8")
    if "tokenizer.json" not in files or "tokenizer_config.json" in files:
        decoder = config.setdefault("added_tokens_decoder", {})
        decoder.update({str(i): {"content": t, **_FLAGS} for t, i in ids.items()})
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")
    log.info("added %d InternVL tokens to the tokenizer: %s", len(ids), ids)
    return Tokenizer(files), missing


def _source_name(name: str, src_names: set[str]) -> str:
    """Where a parameter of the new model is copied from: itself, or the text weights for a new expert."""
    if name in src_names:
        return name
    for expert, text in _EXPERTS.items():
        if expert in name:
            return name.replace(expert, text)
    raise KeyError(name)


def _copy_vocab_rows_(p: torch.Tensor, w: torch.Tensor, new_ids: list[int], n_tokens: int) -> None:
    """Embedding or head rows: the LLM's rows, then the new tokens' rows (past the LLM's rows or on spare rows
    inside them) set to the mean of the rows of the tokenizer's `n_tokens` existing tokens."""
    p[: len(w)].copy_(w)
    if len(p) > len(w) or new_ids:
        mean = w[:n_tokens].float().mean(0, keepdim=True).to(w.dtype)  # (1, D)
        p[len(w):] = mean
        if new_ids:
            p[torch.tensor(new_ids, device=p.device)] = mean


def _template(src_cfg: ModelConfig, tokenizer: Tokenizer) -> str:
    """InternLM2 keeps `internlm2-chat`; another family uses its tokenizer's own chat template."""
    if src_cfg.llm.family == "internlm2":
        return src_cfg.template
    if tokenizer.chat_template is None:
        log.warning("the %s tokenizer has no chat_template: prompts use InternVL's internlm2-chat layout",
                    src_cfg.llm.family)
        return "internlm2-chat"
    return TOKENIZER_TEMPLATE


@torch.no_grad()
def monolithize(llm_model: MonoInternVL, llm_tokenizer: Tokenizer, *, vision: VisionConfig | None = None,
                downsample_ratio: float = 0.5, max_dynamic_patch: int = 12, visual_attention_experts: bool = False,
                out_tokenizer_dir=None, seed: int = 0, std: float = 0.02,
                expert_init: str = "text") -> tuple[MonoInternVL, Tokenizer]:
    """A Mono-InternVL model and tokenizer from a plain LLM (as `monovl.load_model` returns it).

    `expert_init`: "text" copies each visual expert from its text twin, as Mono-InternVL does; "random" draws them
    like the patch embedding (N(0, std²), biases 0). A small LLM learns shapes far sooner from random experts (the
    README's perception measurements)."""
    if expert_init not in EXPERT_INITS:
        raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
    src_cfg = llm_model.cfg
    if src_cfg.vision is not None:
        raise ValueError("monolithize expects a text-only LLM (a *ForCausalLM); this model already has a "
                         "vision part — continue training it from its checkpoint instead")
    vision = vision or VisionConfig()
    tokenizer, new_tokens = add_internvl_tokens(llm_tokenizer)
    ids = [tokenizer.token_to_id(t) for t in INTERNVL_TOKENS]
    old_vocab = src_cfg.llm.vocab_size
    vocab = max(old_vocab, max(ids) + 1)
    new_ids = [tokenizer.token_to_id(t) for t in new_tokens]
    inside = [t for t in new_tokens if tokenizer.token_to_id(t) < old_vocab]
    if inside:  # e.g. Qwen: its embedding has spare rows past the tokenizer's tokens
        log.info("tokens %s got ids inside the LLM's %d rows (spare rows): those rows are re-initialised",
                 inside, old_vocab)
    llm = dataclasses.replace(src_cfg.llm, vocab_size=vocab, visual_ffn_experts=True,
                              visual_attention_experts=visual_attention_experts)
    hf_llm = {k: v for k, v in copy.deepcopy(src_cfg.hf).items() if k not in _LLM_ONLY_FIELDS}
    cfg = ModelConfig(llm=llm, vision=copy.deepcopy(vision), downsample_ratio=downsample_ratio,
                      max_dynamic_patch=max_dynamic_patch, image_token_id=tokenizer.img_context_id,
                      template=_template(src_cfg, tokenizer),
                      hf={"llm_config": hf_llm},
                      generation=copy.deepcopy(src_cfg.generation))
    src = dict(llm_model.named_parameters())
    src_names = set(src)
    ref = llm_model.language_model.head.weight
    with torch.device("meta"):
        model = MonoInternVL(cfg)
    model = model.to_empty(device=ref.device).to(ref.dtype)
    model.language_model.tie_weights()
    added = [*model.vision_model.named_parameters(prefix="vision_model"), *model.mlp1.named_parameters(prefix="mlp1")]
    generator = torch.Generator().manual_seed(seed)
    init_parameters_(added, generator, std)  # patch embedding, mlp1
    for name, p in model.language_model.named_parameters(prefix="language_model"):
        if expert_init == "random" and "_ve." in name:
            init_parameters_([(name, p)], generator, std)
            continue
        w = src[_source_name(name, src_names)]
        if name.endswith(_VOCAB_ROWS):
            _copy_vocab_rows_(p, w, new_ids, n_tokens=min(old_vocab, llm_tokenizer.vocab_size))
        else:
            p.copy_(w)
    if out_tokenizer_dir is not None:
        tokenizer.save(out_tokenizer_dir)
    n_total = sum(p.numel() for p in model.parameters())
    log.info("monolithized: %d → %d parameters, vocab %d → %d, attention experts %s", sum(
        p.numel() for p in src.values()), n_total, old_vocab, vocab, visual_attention_experts)
    return model.eval(), tokenizer
