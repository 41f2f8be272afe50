"""Tiny random Gemma 3 configurations, in transformers and in gemrun, with the same weights."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from gemrun.config import Rope, TextConfig
from gemrun.model.gemma3 import Gemma3
from gemrun.weights.names import hf_to_gemrun

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
            max_position_embeddings=512)


def hf_config(**over) -> Gemma3TextConfig:
    kw = {**TINY, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, **over}
    return Gemma3TextConfig(**kw)


def ours_config(hf: Gemma3TextConfig) -> TextConfig:
    from gemrun.config import from_hf_config

    return from_hf_config(hf.to_dict())


def hf_model(seed: int = 0, **over) -> Gemma3ForCausalLM:
    """A tiny reference model with randomised norm weights (their init is 0, which would hide bugs)."""
    torch.manual_seed(seed)
    cfg = hf_config(**over)
    cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def ours_from(ref: Gemma3ForCausalLM, dtype=torch.float32) -> Gemma3:
    model = Gemma3(ours_config(ref.config)).eval()
    state = {hf_to_gemrun(k): v for k, v in ref.state_dict().items() if hf_to_gemrun(k)}
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


__all__ = ["Rope", "hf_model", "ours_from", "ours_config", "hf_config"]
