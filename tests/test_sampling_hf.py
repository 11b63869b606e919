"""Greedy generation from tiny random transformers checkpoints equals transformers' `generate`, token for token.

V3, V3.2 (index_topk 6, so the DSA selection is active while decoding) and V4 (window 8, CSA rate 4, HCA
rate 8, top-4 entries: generation runs well past all of them). The checkpoints are written by
`save_pretrained` and loaded with `load_checkpoint`; transformers decodes with its own caches (batch 1 per
prompt), v4jax decodes all prompts in one ragged batch.
"""

import numpy as np
import pytest

from v4jax import presets
from v4jax.sampling import generate

torch = pytest.importorskip("torch", reason="parity tests need the `ref` extra (torch, transformers)")
pytest.importorskip("transformers", reason="parity tests need the `ref` extra (transformers)")
from tests.reference import hf_causal_lm, load_without_mtp  # noqa: E402

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")]

NEW_TOKENS = 20
CONFIGS = {
    "v3": presets.tiny(),
    "v32": presets.tiny_v32().replace(index_n_heads=16),
    "v4": presets.tiny_v4().replace(index_n_heads=16),
}


def _hf_greedy(m, prompt, n):
    m.generation_config.eos_token_id = None  # exactly n tokens, as v4jax without stop tokens
    with torch.no_grad():
        ids = torch.tensor([prompt], dtype=torch.long)
        out = m.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generation_matches_transformers_generate(name, tmp_path):
    m = hf_causal_lm(CONFIGS[name], seed=3)
    m.save_pretrained(tmp_path)
    cfg, params = load_without_mtp(tmp_path)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (11, 3, 18)]
    ours = generate(cfg, params, prompts, NEW_TOKENS, prefill_chunk=8)
    for prompt, got in zip(prompts, ours, strict=True):
        assert got == _hf_greedy(m, prompt, NEW_TOKENS)
