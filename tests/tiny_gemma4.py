"""Tiny random Gemma 4 Unified reference models (transformers) and the same weights in gemrun (facts section 7)."""

from __future__ import annotations

import json

import torch

LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
          "full_attention"]
IDS = dict(boi_token_id=500, eoi_token_id=501, image_token_id=502, audio_token_id=503, boa_token_id=504,
           eoa_token_index=505, video_token_id=506)


def reference(seed: int = 0, **text_overrides):
    """A 322k-parameter Gemma4UnifiedForConditionalGeneration with perturbed norms, position table and scalars."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=8, final_logit_softcapping=30.0, layer_types=list(LAYERS),
                max_position_embeddings=4096) | text_overrides
    vision = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, output_proj_dims=32, mm_posemb_size=64)
    cfg = Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=dict(audio_embed_dim=640), **IDS)
    torch.manual_seed(seed)
    ref = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "_ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "pos_embedding" in name:
                p.normal_(0, 0.1)
        for i, (name, b) in enumerate(ref.named_buffers()):
            if name.endswith("layer_scalar"):
                b.fill_(0.8 + 0.05 * (i % 4))
    return ref


def ours(ref, vision_attention: str | None = "sliding"):
    """gemrun's text model and media embedders holding the reference's weights."""
    from gemrun.config import gemma4_from_hf_config
    from gemrun.model.gemma4 import Gemma4, Gemma4Media, media_from_hf_config
    from gemrun.weights.names import gemma4_hf_to_gemrun

    raw = json.loads(ref.config.to_json_string())
    text_cfg = gemma4_from_hf_config(raw).replace(vision_attention=vision_attention)
    parts = torch.nn.ModuleDict({"text": Gemma4(text_cfg), "media": Gemma4Media(media_from_hf_config(raw), 64)})
    state = {gemma4_hf_to_gemrun(n): t for n, t in ref.state_dict().items() if gemma4_hf_to_gemrun(n)}
    parts.load_state_dict(state, strict=True)
    return parts["text"].eval(), parts["media"].eval()


def multimodal_inputs(seed: int = 1, n_image: int = 12, n_audio: int = 5):
    """Reference kwargs for a prompt with text, an image of `n_image` soft tokens (12 > the window of 8), audio
    frames and a two-frame video, with padding rows as the processors make them."""
    g = torch.Generator().manual_seed(seed)
    seq = ([2, 10, 11, 500] + [502] * n_image + [501, 12, 13, 504] + [503] * n_audio + [505, 14]
           + [500] + [506] * 4 + [501, 15] + [500] + [506] * 4 + [501, 16, 17])
    ids = torch.tensor([seq])
    types = torch.zeros_like(ids)
    types[ids == 502], types[ids == 506], types[ids == 503] = 1, 2, 3
    pixels, positions = torch.rand(1, n_image + 4, 192, generator=g), torch.full((1, n_image + 4, 2), -1)
    cols = 4
    positions[0, :n_image] = torch.tensor([(i % cols, i // cols) for i in range(n_image)])
    video, video_pos = torch.rand(2, 5, 192, generator=g), torch.full((2, 5, 2), -1)
    video_pos[:, :4] = torch.tensor([(0, 0), (1, 0), (0, 1), (1, 1)])
    audio, audio_mask = torch.randn(1, n_audio + 1, 640, generator=g), torch.ones(1, n_audio + 1, dtype=torch.bool)
    audio_mask[0, -1] = False
    return dict(input_ids=ids, pixel_values=pixels, image_position_ids=positions, pixel_values_videos=video,
                video_position_ids=video_pos, num_frames_per_video=torch.tensor([2]), input_features=audio,
                input_features_mask=audio_mask, mm_token_type_ids=types)


def soft_tokens(media, kw):
    """gemrun soft tokens for `multimodal_inputs` kwargs: padding rows dropped, as get_*_features do."""
    pix, pos = kw["pixel_values"][0], kw["image_position_ids"][0]
    vpix, vpos = kw["pixel_values_videos"], kw["video_position_ids"]
    keep, vkeep = (pos != -1).all(-1), (vpos != -1).all(-1)
    return {502: media.image(pix[keep], pos[keep]), 506: media.image(vpix[vkeep], vpos[vkeep]),
            503: media.audio(kw["input_features"][0][kw["input_features_mask"][0]])}


def patch_reference_drafting() -> None:
    """The two stock transformers 5.23 bugs that stop the assistant (facts section 6): an all-sharing drafter
    config is rejected, and a target with no sharing layers stores no K/V for it."""
    from transformers.models.gemma4_unified import configuration_gemma4_unified as conf

    cls = conf.Gemma4UnifiedTextConfig
    if getattr(cls, "_gemrun_patched", False):
        return
    original = cls.kv_sharing_modes.fget

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original(self)

    cls.kv_sharing_modes, cls._gemrun_patched = property(modes), True


def reference_pair(seed: int = 0):
    """A tiny target (stores the K/V of its last sliding and last global layer) and a tiny assistant."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    patch_reference_drafting()
    target = reference(seed)
    types = target.config.text_config.layer_types
    for kind in set(types):
        last = max(i for i, t in enumerate(types) if t == kind)
        target.model.language_model.layers[last].self_attn.store_full_length_kv = True
    text = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                num_kv_shared_layers=2)
    torch.manual_seed(seed + 100)
    drafter = Gemma4UnifiedAssistantForCausalLM(Gemma4UnifiedAssistantConfig(text_config=text,
                                                                              backbone_hidden_size=64)).eval()
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return target, drafter


def ours_drafter(ref_drafter):
    from gemrun.config import gemma4_from_hf_config
    from gemrun.model.gemma4 import Drafter

    raw = json.loads(ref_drafter.config.to_json_string())
    model = Drafter(gemma4_from_hf_config(dict(raw["text_config"], num_kv_shared_layers=0)),
                    raw["backbone_hidden_size"])
    state = {n.removeprefix("model."): t for n, t in ref_drafter.state_dict().items() if n != "lm_head.weight"}
    model.load_state_dict(state, strict=True)
    return model.eval()


REAL_IDS = dict(boi_token_id=255_999, eoi_token_id=258_882, image_token_id=258_880, audio_token_id=258_881,
                boa_token_id=256_000, eoa_token_index=258_883, video_token_id=258_884)


def write_model_dir(path, seed: int = 0, with_drafter: bool = False, **text_overrides):
    """A loadable Gemma 4 Unified HF directory: tiny random weights over the full 262144-token vocabulary (so
    Gemma 4's special tokens have their real ids), the test tokenizer (tiny4.py) without a chat template (the
    built-in applies), image and audio embedders; optionally a matching drafter in `path/drafter`.
    `text_overrides` change the text config (KV sharing, wider MLPs)."""
    from pathlib import Path

    from tiny4 import gemma4_tokenizer
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    path = Path(path)
    text = dict(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8, final_logit_softcapping=30.0,
                layer_types=list(LAYERS), max_position_embeddings=4096, eos_token_id=[1, 106]) | text_overrides
    vision = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=32, output_proj_dims=32, mm_posemb_size=1120)
    cfg = Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=dict(audio_embed_dim=640),
                              **REAL_IDS)
    torch.manual_seed(seed)
    Gemma4UnifiedForConditionalGeneration(cfg).eval().save_pretrained(path)
    gemma4_tokenizer().backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<bos>",
                                                            "eos_token": "<eos>", "pad_token": "<pad>"}))
    if with_drafter:
        from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

        patch_reference_drafting()
        dtext = dict(text, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=2)
        dtext.pop("final_logit_softcapping")
        torch.manual_seed(seed + 1)
        Gemma4UnifiedAssistantForCausalLM(Gemma4UnifiedAssistantConfig(text_config=dtext, backbone_hidden_size=64)
                                          ).eval().save_pretrained(path / "drafter")
    return path


# --- a 512-token Gemma 4 vocabulary and loadable HF directories for the GGUF tests ------------------------------

MEDIA_AT = {500: "<|image>", 501: "<image|>", 502: "<|image|>", 503: "<|audio|>", 504: "<|audio>", 505: "<audio|>",
            506: "<|video|>"}  # the tiny reference's ids (IDS)
VISIBLE_AT = {4: "<tool_response|>", 5: '<|"|>', 507: "<|channel>", 508: "<channel|>", 509: "<|tool_call>",
              510: "<tool_call|>", 511: "<|tool_response>"}


def tiny4_vocab() -> tuple[list[str], list[int]]:
    """tests/tiny.py's 512 tokens with Gemma 4's media tokens at the tiny reference's ids and the tokens llama.cpp
    writes user-defined (channel, tool call, <|"|>), all control tokens."""
    from tiny import tiny_vocab

    tokens, types = tiny_vocab()
    for i, t in {**MEDIA_AT, **VISIBLE_AT}.items():
        tokens[i], types[i] = t, 3
    return tokens, types


def write_tiny_dir(path, ref, suppress=(505, 501)):
    """`ref` (a tiny reference from `reference`) saved as a loadable HF directory with the 512-token tokenizer
    and a generation config that suppresses ids."""
    from pathlib import Path

    from gemrun.tokenizer import build_backend

    path = Path(path)
    ref.save_pretrained(path)
    build_backend(*tiny4_vocab()).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<bos>",
                                                            "eos_token": "<eos>", "pad_token": "<pad>"}))
    gen = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() \
        else {}
    (path / "generation_config.json").write_text(json.dumps(gen | {"suppress_tokens": list(suppress)}))
    return path


def reference_assistant(seed: int = 0, ordered: bool = False, backbone: int = 64):
    """A tiny assistant (as `reference_pair`'s), optionally with the centroid head: 8 centroids over the
    512-token vocabulary, the top 2 used, the token ordering a random permutation."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    patch_reference_drafting()
    text = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                num_kv_shared_layers=2)
    extra = dict(use_ordered_embeddings=True, num_centroids=8, centroid_intermediate_top_k=2) if ordered else {}
    torch.manual_seed(seed + 100)
    drafter = Gemma4UnifiedAssistantForCausalLM(Gemma4UnifiedAssistantConfig(text_config=text,
                                                                              backbone_hidden_size=backbone,
                                                                              **extra)).eval()
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in drafter.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.9)
        if ordered:
            drafter.masked_embedding.token_ordering.copy_(torch.randperm(512, generator=torch.Generator()
                                                                        .manual_seed(seed)))
    return drafter
