"""Qwen2/2.5, Qwen3 and Llama 2/3 LLMs: loaded from folders that `transformers` writes, compared with its models.

Each case builds a tiny random model of the family with `transformers` (`*Config(...)` + `save_pretrained`, no
download), loads the folder with monovl and compares fp32 logits, cached decoding and greedy generations.
"""
import pytest
import torch

from monovl.checkpoint import load_model
from monovl.generation import generate

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # fp32, the same arithmetic in a different order
SMALL = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
CASES = {  # name → (config class, model class, config fields, save_pretrained keywords)
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6), {}),
    "qwen2.5-untied-sharded": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False),
                               dict(max_shard_size="40KB")),
    "qwen3-head-dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True), {}),
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4), {}),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, head_dim=16,
                                                                    tie_word_embeddings=True), {}),
    "llama-biases": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True), {}),
}


def build_reference(case: str, path, seed: int = 0, **overrides):
    """A random `transformers` model of the case's family (config fields `overrides` changed), saved to `path`
    → the model (eval, fp32)."""
    config_cls, model_cls, fields, save_kwargs = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**SMALL, **fields, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random (not zero) biases and norm weights, so that each is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = build_reference(request.param, path)
    return request.param, reference, load_model(path, dtype=torch.float32), path


def test_config_and_names_are_the_checkpoints(pair):
    case, reference, model, _ = pair
    ours = dict(model.named_parameters())
    theirs = {f"language_model.{k}": v for k, v in reference.named_parameters()}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.cfg.architecture == reference.config.architectures[0]
    tied = reference.config.tie_word_embeddings
    assert (model.language_model.head.weight is model.language_model.embed_tokens.weight) == tied


def test_logits_match_transformers(pair):
    case, reference, model, _ = pair
    ids = torch.randint(3, 211, (2, 70), generator=torch.Generator().manual_seed(1))  # longer than 32: llama3 bands
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids)
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{case}: max abs diff {diff:.2e}"


def test_cached_decoding_matches_full_forward(pair):
    case, _, model, _ = pair
    ids = torch.randint(3, 211, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)[0, -1]
        cache = model.new_cache(1, 32)
        model(ids[:, :20], input_pos=torch.arange(20)[None], cache=cache)
        step = model(ids[:, 20:], input_pos=torch.arange(20, 24)[None], cache=cache)[0, -1]
    assert (step - full).abs().max().item() <= ATOL


def test_greedy_generation_matches_transformers(pair):
    case, reference, model, _ = pair
    ids = torch.randint(3, 211, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = want[0, 12:].tolist()
    for cached in (True, False):
        got = generate(model, ids, max_new_tokens=10, temperature=0.0)[0].tolist() if cached else \
            _greedy_without_cache(model, ids, 10)
        assert got == want, f"{case} (cache {cached})"


def _greedy_without_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()
