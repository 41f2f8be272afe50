"""A Gemma 4 GGUF set written without gemrun's converter: the `gguf` package's writer, the text tensor names from
its own MODEL_ARCH.GEMMA4 table, keys and the other names as llama.cpp spells them (gguf-py/gguf/constants.py:
V_ENC_EMBD_PATCH "v.patch_embd", V_ENC_EMBD_PATCH_NORM "v.patch_norm.{bid}", V_ENC_EMBD_POS "v.position_embd",
V_MMPROJ "mm.input_projection", A_MM_INP_PROJ "mm.a.input_projection", NEXTN_PROJ_PRE / _POST
"nextn.pre_projection" / "nextn.post_projection"), the values transformed as llama.cpp's conversion/gemma.py
transforms them (Gemma4Model, Gemma4UnifiedVisionAudioModel, Gemma4AssistantModel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, GGUFWriter

HF_PART = {"self_attn.q_proj": MODEL_TENSOR.ATTN_Q, "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
           "self_attn.v_proj": MODEL_TENSOR.ATTN_V, "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
           "self_attn.q_norm": MODEL_TENSOR.ATTN_Q_NORM, "self_attn.k_norm": MODEL_TENSOR.ATTN_K_NORM,
           "input_layernorm": MODEL_TENSOR.ATTN_NORM, "post_attention_layernorm": MODEL_TENSOR.ATTN_POST_NORM,
           "pre_feedforward_layernorm": MODEL_TENSOR.FFN_PRE_NORM,
           "post_feedforward_layernorm": MODEL_TENSOR.FFN_POST_NORM, "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
           "mlp.up_proj": MODEL_TENSOR.FFN_UP, "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
           "layer_scalar": MODEL_TENSOR.LAYER_OUT_SCALE}


def _name(tensor: MODEL_TENSOR, bid: int | None = None) -> str:
    assert tensor in MODEL_TENSORS[MODEL_ARCH.GEMMA4]
    return TENSOR_NAMES[tensor].format(bid=bid) + ".weight"


def _layers(state: dict, prefix: str):
    for key, t in state.items():
        if key.startswith(prefix + "layers."):
            bid, part = key[len(prefix) + 7:].split(".", 1)
            yield _name(HF_PART[part.removesuffix(".weight")], int(bid)), t


def _global(text: dict, key: str):
    """A global layer's value (transformers keeps them in per_layer_config)."""
    return next(iter(text["per_layer_config"].values()))[key]


def _hparams(w: GGUFWriter, text: dict, arch: str) -> None:
    kinds = text["layer_types"]
    w.add_block_count(text["num_hidden_layers"])
    w.add_context_length(text["max_position_embeddings"])
    w.add_embedding_length(text["hidden_size"])
    w.add_feed_forward_length(text["intermediate_size"])
    w.add_head_count(text["num_attention_heads"])
    w.add_head_count_kv([text["num_key_value_heads"] if k == "sliding_attention" else
                         _global(text, "num_key_value_heads") for k in kinds])
    w.add_key_length(_global(text, "head_dim"))
    w.add_value_length(_global(text, "head_dim"))
    w.add_key_length_swa(text["head_dim"])
    w.add_value_length_swa(text["head_dim"])
    w.add_rope_dimension_count(_global(text, "head_dim"))
    w.add_rope_dimension_count_swa(text["head_dim"])
    w.add_rope_freq_base(text["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(text["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    w.add_sliding_window(text["sliding_window"])
    w.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
    w.add_shared_kv_layers(text["num_kv_shared_layers"])
    w.add_embedding_length_per_layer_input(0)
    if text.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(text["final_logit_softcapping"])


def _rope_freqs(text: dict) -> np.ndarray:
    full, dim = text["rope_parameters"]["full_attention"], _global(text, "head_dim")
    rotated = int(dim * full["partial_rotary_factor"] / 2)
    return np.array([1.0] * rotated + [1e30] * (dim // 2 - rotated), dtype=np.float32)


def _tokenizer(w: GGUFWriter, vocab) -> None:
    from gemrun.tokenizer import build_backend

    tokens, types = vocab
    backend = json.loads(build_backend(tokens, types).to_str())
    visible = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
               '<|"|>'}
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * len(tokens))
    w.add_token_types([4 if t in visible else ty for t, ty in zip(tokens, types)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_array("tokenizer.ggml.suppress_tokens", [505, 501])


def _save(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_independent(ref, assistant, out: Path, vocab) -> tuple[Path, Path, Path]:
    text_cfg = ref.config.text_config.to_dict()
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    w = GGUFWriter(str(out / "text.gguf"), "gemma4")
    _hparams(w, text_cfg, "gemma4")
    _tokenizer(w, vocab)
    w.add_tensor(_name(MODEL_TENSOR.ROPE_FREQS), _rope_freqs(text_cfg))
    w.add_tensor(_name(MODEL_TENSOR.TOKEN_EMBD), state["model.language_model.embed_tokens.weight"])
    w.add_tensor(_name(MODEL_TENSOR.OUTPUT_NORM), state["model.language_model.norm.weight"])
    for name, t in _layers(state, "model.language_model."):
        w.add_tensor(name, t.reshape(1) if t.ndim == 0 else t)  # norms stored as they are (norm_shift 0)
    _save(w)

    # mmproj: Gemma4UnifiedVisionAudioModel.modify_tensors
    vcfg, acfg = ref.config.vision_config, ref.config.audio_config
    w = GGUFWriter(str(out / "mmproj.gguf"), "clip")
    w.add_clip_has_vision_encoder(True)
    w.add_clip_has_audio_encoder(True)
    w.add_clip_vision_projector_type("gemma4uv")
    w.add_clip_audio_projector_type("gemma4ua")
    w.add_vision_projection_dim(text_cfg["hidden_size"])
    w.add_audio_projection_dim(text_cfg["hidden_size"])
    w.add_vision_embedding_length(vcfg.mm_embed_dim)
    w.add_audio_embedding_length(acfg.audio_embed_dim)
    w.add_vision_patch_size(vcfg.patch_size)
    w.add_vision_projector_scale_factor(vcfg.pooling_kernel_size)
    w.add_vision_image_size(224)
    w.add_vision_attention_layernorm_eps(1e-6)
    p = vcfg.patch_size * vcfg.pooling_kernel_size
    i = np.arange(p * p * 3)
    perm = (i % (p * p)) // p * p * 3 + i % p * 3 + i // (p * p)
    ve = "model.embed_vision."  # transformers' module names (saved as model.vision_embedder.*)
    w.add_tensor("v.patch_embd.weight", state[ve + "patch_dense.weight"][:, perm])
    w.add_tensor("v.patch_embd.bias", state[ve + "patch_dense.bias"])
    w.add_tensor("v.patch_norm.1.weight", state[ve + "patch_ln1.weight"][perm])
    w.add_tensor("v.patch_norm.1.bias", state[ve + "patch_ln1.bias"][perm])
    for n, hf in ((2, "patch_ln2"), (3, "pos_norm")):
        for kind in ("weight", "bias"):
            w.add_tensor(f"v.patch_norm.{n}.{kind}", state[f"{ve}{hf}.{kind}"])
    w.add_tensor("v.position_embd.weight", np.ascontiguousarray(state[ve + "pos_embedding"].transpose(1, 0, 2)))
    w.add_tensor("mm.input_projection.weight", state[ve + "multimodal_embedder.embedding_projection.weight"])
    w.add_tensor("mm.a.input_projection.weight", state["model.embed_audio.embedding_projection.weight"])
    _save(w)

    # drafter: Gemma4AssistantModel (arch gemma4-assistant)
    dcfg = assistant.config.text_config.to_dict()
    dstate = {k: v.detach().float().numpy() for k, v in assistant.state_dict().items()}
    arch = "gemma4-assistant"
    w = GGUFWriter(str(out / "assistant.gguf"), arch)
    _hparams(w, dcfg, arch)
    w.add_embedding_length_out(assistant.config.backbone_hidden_size)
    w.add_nextn_predict_layers(dcfg["num_hidden_layers"])
    _tokenizer(w, vocab)
    w.add_tensor(_name(MODEL_TENSOR.ROPE_FREQS), _rope_freqs(dcfg))
    w.add_tensor(_name(MODEL_TENSOR.TOKEN_EMBD), dstate["model.embed_tokens.weight"])
    w.add_tensor(_name(MODEL_TENSOR.OUTPUT_NORM), dstate["model.norm.weight"])
    w.add_tensor("nextn.pre_projection.weight", dstate["pre_projection.weight"])
    w.add_tensor("nextn.post_projection.weight", dstate["post_projection.weight"])
    for name, t in _layers(dstate, "model."):
        w.add_tensor(name, t.reshape(1) if t.ndim == 0 else t)
    _save(w)
    return out / "text.gguf", out / "mmproj.gguf", out / "assistant.gguf"

