"""Gemma 4 GGUFs as llama.cpp lays them out (conversion/gemma.py, src/models/gemma4*.cpp,
tools/mtmd/models/gemma4uv.cpp): the text model (`general.architecture = gemma4`), the mmproj (`clip`, image
projector `gemma4uv` and audio projector `gemma4ua` in one file) and the MTP drafter (`gemma4-assistant`; the
`gemma4-mtp` variant's names too). Here: which tensors a file must hold, their gemrun names, how stored values
map back to the HF convention, and the configs; `load.py` builds the modules.

What differs from Gemma 3's layout: norms are stored as they are (Gemma 4 scales by w, not 1 + w); the layer
scalar is `blk.N.layer_output_scale`; proportional RoPE is the `rope_freqs.weight` tensor; keys double as values
on global layers exactly when those layers have no `attn_v`; the tokenizer is `tokenizer.ggml.model = gemma4`
(BPE with stored merges, the channel / tool-call / `<|"|>` tokens user-defined so that llama.cpp prints them).
In the mmproj, the patch projection's columns and the first LayerNorm are stored in CHW order (ggml's im2col)
instead of HF's HWC, the position table as (axis, position, d), and `pos_norm` as `v.patch_norm.3`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from .. import tokenizer as tok
from ..config import Gemma4TextConfig, check_field
from ..errors import ConfigError, WeightsError
from ..model.gemma4 import MediaConfig
from .gguf import GGUFFile, check_tokenizer_metadata
from .gguf_config import DRAFTER_ARCHS, Meta, drafter_config, gemma4_config, keys_are_values, partial_from_rope_freqs
from .names import GEMMA4_MMPROJ, ROPE_FREQS, drafter_gguf_to_gemrun, gemma4_gguf_to_gemrun

# Tokens llama.cpp's converter types USER_DEFINED so that its detokenizer prints them; for gemrun they are
# control tokens (only templates produce them, user text never does).
VISIBLE = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>')
USER_DEFINED, CONTROL = 4, 3
# media token ids come from the tokenizer: an mmproj names none
MEDIA_TOKENS = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_id": "<audio|>",
                "audio_token_id": "<|audio|>"}


def is_gemma4(meta: dict[str, Any]) -> bool:
    return meta.get("general.architecture") == "gemma4"


def _unknown(kind: str, names: list[str]) -> WeightsError:
    shown = ", ".join(repr(n[:80]) for n in names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return WeightsError(f"GGUF tensors that are not part of a {kind}: {shown}")


def _partial(g: GGUFFile, global_head_dim: int) -> float:
    """The proportional-RoPE factor `rope_freqs.weight` encodes (1.0 without the tensor)."""
    if ROPE_FREQS not in g.tensors:
        return 1.0
    if g.tensors[ROPE_FREQS].qtype != Q.F32:
        raise WeightsError("rope_freqs.weight must be F32")
    return partial_from_rope_freqs(g.load(ROPE_FREQS), global_head_dim)


def _rows(g: GGUFFile, name: str) -> int:
    if name not in g.tensors:
        raise WeightsError(f"GGUF has no {name}")
    return g.tensors[name].shape[0]


def text_layout(g: GGUFFile) -> tuple[Gemma4TextConfig, dict[str, str]]:
    """A text GGUF's config and its tensors by gemrun name (`text.*`) -> GGUF name."""
    meta = g.metadata
    names, unknown = {}, []
    for name in g.tensors:
        ours = gemma4_gguf_to_gemrun(name)
        if ours is not None:
            names["text." + ours] = name
        elif name != ROPE_FREQS:
            unknown.append(name)
    if unknown:
        raise _unknown("Gemma 4 text model", unknown)
    partial = _partial(g, Meta(meta, "gemma4").get("global_head_dim", "attention.key_length"))
    rows = _rows(g, "token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != rows:  # llama.cpp requires it too; a larger vocabulary would
        raise WeightsError(f"GGUF has {len(tokens)} tokens but token_embd.weight {rows} rows")  # index past it
    cfg = gemma4_config(meta, "gemma4", partial, k_eq_v=keys_are_values(meta, g.tensors), vocab_size=rows)
    return cfg, names


def tokenizer(meta: dict[str, Any]) -> tok.Tokenizer:
    """The tokenizer of a Gemma 4 GGUF (`gemma4`: stored merges; a `llama` vocabulary works too). The visible
    control tokens become control tokens again; BOS is added as the file says (llama.cpp's converter: always)."""
    model = meta.get("tokenizer.ggml.model")
    types = [CONTROL if t == USER_DEFINED and s in VISIBLE else int(t)
             for s, t in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])]
    return tok.from_gguf_metadata({**meta, "tokenizer.ggml.token_type": types},
                                  model="gemma4" if model == "gemma4" else "llama")


def media_token_ids(t: tok.Tokenizer) -> dict[str, int]:
    ids = {f: t.token_to_id(s) for f, s in MEDIA_TOKENS.items()}
    missing = [MEDIA_TOKENS[f] for f, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"the GGUF tokenizer lacks Gemma 4's media tokens {', '.join(missing)}: it cannot go "
                          "with an mmproj")
    return ids


# --- mmproj -----------------------------------------------------------------------------------------------------


def chw_order(p: int) -> torch.Tensor:
    """perm[i] = the HWC index of CHW position i in a p x p x 3 patch (ggml's im2col gives CHW)."""
    i = torch.arange(p * p * 3)
    return (i % (p * p)) // p * p * 3 + i % p * 3 + i // (p * p)


def media_config(meta: dict[str, Any], text: Gemma4TextConfig, g: GGUFFile) -> MediaConfig:
    if meta.get("general.architecture") != "clip":
        raise WeightsError(f"mmproj GGUF architecture is {str(meta.get('general.architecture'))[:40]!r}, not 'clip'")
    vision, audio = meta.get("clip.has_vision_encoder") is True, meta.get("clip.has_audio_encoder") is True
    if not vision and not audio:
        raise WeightsError("mmproj GGUF has neither a vision nor an audio encoder")
    m = Meta(meta, "clip")
    kw: dict[str, Any] = {"vision": vision, "audio_embed_dim": None}
    for kind, on, want in (("vision", vision, "gemma4uv"), ("audio", audio, "gemma4ua")):
        if not on:
            continue
        found = meta.get(f"clip.{kind}.projector_type", meta.get("clip.projector_type"))
        if found != want:
            raise WeightsError(f"mmproj clip.{kind}.projector_type is {str(found)[:40]!r}; Gemma 4 Unified uses "
                               f"{want!r}")
        if m.get("hidden_size", f"{kind}.projection_dim") != text.hidden_size:
            raise WeightsError(f"mmproj projects {kind} to {m.get('hidden_size', f'{kind}.projection_dim')} but the "
                               f"text model is {text.hidden_size} wide")
        eps = m.get("rms_norm_eps", f"{kind}.attention.layer_norm_epsilon", 1e-6)
        width = m.get("hidden_size", f"{kind}.embedding_length")
        if kind == "vision":
            kw.update(vision_eps=eps, mm_embed_dim=width, patch_size=m.get("head_dim", "vision.patch_size"),
                      pooling_kernel_size=m.get("head_dim", "vision.projector.scale_factor", 3))
            kw["mm_posemb_size"] = g.tensors["v.position_embd.weight"].shape[1] if "v.position_embd.weight" in \
                g.tensors else 1
        else:
            kw.update(audio_eps=eps, audio_embed_dim=width)
    return MediaConfig(**kw)


@dataclass
class MediaLayout:
    g: GGUFFile
    config: MediaConfig
    names: dict[str, str]  # `Gemma4Media` name -> GGUF name

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes as the module holds them (the position table is stored (axis, position, d))."""
        out = {}
        for ours, name in self.names.items():
            shape = tuple(self.g.tensors[name].shape)
            out[ours] = (shape[1], shape[0], *shape[2:]) if name == "v.position_embd.weight" else shape
        return out

    def read(self, ours: str) -> torch.Tensor:
        """One tensor as float32 in the HF convention (HWC patch order, position table (position, axis, d))."""
        name = self.names[ours]
        t = torch.from_numpy(self.g.load(name))
        self.g.release(name)
        if name in ("v.patch_embd.weight", "v.patch_norm.1.weight", "v.patch_norm.1.bias"):
            p = self.config.patch_size * self.config.pooling_kernel_size
            if t.shape[-1] != p * p * 3:
                raise WeightsError(f"{name} has {t.shape[-1]} inputs; patches of {p} px have {p * p * 3}")
            t = t[..., torch.argsort(chw_order(p))]  # stored CHW -> HWC
        return t.permute(1, 0, 2).contiguous() if name == "v.position_embd.weight" else t


def mmproj_layout(g: GGUFFile, text: Gemma4TextConfig) -> MediaLayout:
    check_tokenizer_metadata(g.metadata, required=False)
    cfg = media_config(g.metadata, text, g)
    names, unknown = {}, []
    for name in g.tensors:
        if name in GEMMA4_MMPROJ:
            names[GEMMA4_MMPROJ[name]] = name
        else:
            unknown.append(name)
    if unknown:
        raise _unknown("Gemma 4 Unified mmproj (gemma4uv / gemma4ua)", unknown)
    return MediaLayout(g, cfg, names)


# --- drafter ----------------------------------------------------------------------------------------------------


@dataclass
class DrafterLayout:
    config: Gemma4TextConfig
    backbone: int
    names: dict[str, str]  # `Drafter` name -> GGUF name
    centroids: tuple[int, int] | None  # (count, top k) of the centroid-narrowed head


def drafter_layout(g: GGUFFile) -> DrafterLayout:
    meta = g.metadata
    check_tokenizer_metadata(meta, required=False)  # unused (the target's tokenizer serves), but typed
    arch = meta.get("general.architecture")
    if arch not in DRAFTER_ARCHS:
        raise ConfigError(f"GGUF architecture {str(arch)[:40]!r} is not a Gemma 4 drafter "
                          f"(expected {' or '.join(DRAFTER_ARCHS)})")
    names, unknown = {}, []
    for name in g.tensors:
        ours = drafter_gguf_to_gemrun(name)
        if ours is not None:
            if ours in names:
                raise WeightsError(f"GGUF tensors {names[ours]!r} and {name!r} are the same drafter tensor")
            names[ours] = name
        elif name != ROPE_FREQS:
            unknown.append(name)
    if unknown:
        raise _unknown("Gemma 4 drafter", unknown)
    partial = _partial(g, Meta(meta, arch).get("global_head_dim", "attention.key_length"))
    cfg, backbone = drafter_config(meta, partial)
    cfg = dataclasses.replace(cfg, vocab_size=_rows(g, names.get("embed_tokens.weight", "token_embd.weight")))
    head = {"masked_embedding.centroids.weight", "masked_embedding.token_ordering"} & set(names)
    centroids = None
    if head:
        if len(head) == 1:
            raise WeightsError("a centroid head needs both masked_embd_centroids.weight and masked_embd_ordering")
        count = g.tensors[names["masked_embedding.centroids.weight"]].shape[0]
        top = check_field("num_kv_heads", meta.get(f"{arch}.centroid_top_k", 32), f"GGUF {arch}.centroid_top_k")
        if cfg.vocab_size % count or not top <= count:
            raise WeightsError(f"{count} centroids (top {top}) do not divide the vocabulary of {cfg.vocab_size}")
        centroids = (count, top)
    return DrafterLayout(cfg, backbone, names, centroids)


def token_ordering(g: GGUFFile, name: str, vocab: int) -> torch.Tensor:
    """`masked_embd_ordering`: the token ids of each centroid's cluster, a permutation of the vocabulary."""
    info = g.tensors[name]
    kinds = {Q.I32: np.int32, Q.I64: np.int64, Q.F32: np.float32}
    if info.qtype not in kinds or info.shape != (vocab,):
        raise WeightsError(f"{name} must be I32/I64 of shape ({vocab},), got {info.qtype.name} {info.shape}")
    ids = g.raw(name).reshape(-1).view(kinds[info.qtype]).astype(np.int64)
    if not np.array_equal(np.sort(ids), np.arange(vocab)):
        raise WeightsError(f"{name} is not a permutation of the {vocab} token ids")
    return torch.from_numpy(ids)
