"""Model configuration <-> GGUF metadata, both directions, under llama.cpp's keys (`gguf-py/gguf/constants.py`
Keys) and with the semantics of its readers: `src/models/gemma3.cpp`, `gemma4.cpp`, `gemma4-assistant.cpp`
(`load_arch_hparams`).

Gemma 3: llama.cpp's reader turns on sliding layers only when `attention.sliding_window` is set, takes the layer
pattern from `attention.sliding_window_pattern` (a bool per layer, or a period; default 6), the local RoPE base
from `rope.freq_base_swa` (default 10 000), and derives the attention scale from `attention.key_length` (the 27B,
62 layers: hidden / heads). A config these keys cannot express is refused when written, never changed silently.

Gemma 4: every per-layer value is an array (`attention.head_count_kv`, `attention.sliding_window_pattern`, maybe
`feed_forward_length`), global and sliding layers have their own head sizes (`key_length` / `key_length_swa`) and
RoPE bases; proportional RoPE is not a key but the `rope_freqs.weight` tensor (read by the loader, which passes
its partial factor in), and keys doubling as values is the absence of `attn_v` on global layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..config import Gemma4TextConfig, Rope, TextConfig, check_field
from ..errors import ConfigError, WeightsError

GEMMA4_ARCHS = ("gemma4",)
DRAFTER_ARCHS = ("gemma4-assistant", "gemma4-mtp", "gemma4_assistant")  # the last two: published variants
DEFAULT_PERIOD = 6  # llama.cpp's gemma3 default: 5 sliding layers, then a global one
LOCAL_THETA = 10_000.0  # llama-hparams.h's rope_freq_base_train_swa for gemma3


class Meta:
    """Typed reads of one architecture's keys; errors name the key."""

    def __init__(self, meta: dict[str, Any], arch: str):
        self.meta, self.arch = meta, arch

    def key(self, name: str) -> str:
        return name if name.startswith(("general.", "tokenizer.")) else f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self.key(name) in self.meta

    def get(self, field: str, name: str, default: Any = None) -> Any:
        """Key `name` checked as config field `field` (type and range)."""
        key = self.key(name)
        value = self.meta.get(key, default)
        if value is None:
            raise ConfigError(f"GGUF metadata is missing {key}")
        if isinstance(value, np.ndarray):
            raise ConfigError(f"GGUF {key} must be a single value, not an array")
        value = check_field(field, value, f"GGUF {key}")
        if isinstance(value, float) and float(np.float32(value)) == value:
            # a float32 key: its shortest decimal (1e-6 comes back as 1e-6, not 9.99999997e-07)
            value = float(np.format_float_positional(np.float32(value), unique=True))
        return value

    def per_layer(self, field: str, name: str, n: int, default: Any = None) -> list:
        """A key that is one value or an array of one value per layer."""
        key = self.key(name)
        value = self.meta.get(key, default)
        if value is None:
            raise ConfigError(f"GGUF metadata is missing {key}")
        if not isinstance(value, np.ndarray):
            return [check_field(field, value, f"GGUF {key}")] * n
        if value.ndim != 1 or len(value) != n or value.dtype.kind not in "iu":
            raise ConfigError(f"GGUF {key} must hold {n} integers, one per layer")
        return [check_field(field, int(v), f"GGUF {key}") for v in value]

    def flags(self, name: str, n: int) -> list[bool] | None:
        """A bool per layer (None when absent)."""
        value = self.meta.get(self.key(name))
        if value is None:
            return None
        if not isinstance(value, np.ndarray) or value.dtype != bool or value.shape != (n,):
            raise ConfigError(f"GGUF {self.key(name)} must hold {n} booleans, one per layer")
        return [bool(v) for v in value]

    def optional_float(self, field: str, name: str) -> float | None:
        value = self.meta.get(self.key(name))
        return None if value in (None, 0, 0.0) else self.get(field, name)


def _token_ids(m: Meta, stops: tuple[int, ...]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if m.has(f"tokenizer.ggml.{key}"):
            kw[ours] = m.get(ours, f"tokenizer.ggml.{key}")
    kw["stop_token_ids"] = tuple(dict.fromkeys((kw.get("eos_token_id", 1), *stops)))
    suppress = m.meta.get("tokenizer.ggml.suppress_tokens")
    if suppress is not None:
        if not isinstance(suppress, np.ndarray) or suppress.dtype != np.int32 or suppress.ndim != 1:
            raise ConfigError("GGUF tokenizer.ggml.suppress_tokens must be an array of int32 token ids")
        kw["suppress_token_ids"] = tuple(int(t) for t in suppress)
    return kw


def config_from_gguf(meta: dict[str, Any], tensors: Iterable[str] = ()) -> TextConfig:
    """The text config a GGUF describes: a Gemma 3 or a Gemma 4 model (the Gemma 4 drafter: `drafter_config`).
    A Gemma 4 file's tensor names tell whether keys double as values (RoPE's partial factor is left out: it needs
    a tensor's values, `gemma4_gguf.text_layout`)."""
    arch = meta.get("general.architecture")
    if arch == "gemma3":
        return gemma3_config(meta)
    if arch in GEMMA4_ARCHS:
        return gemma4_config(meta, arch, k_eq_v=keys_are_values(meta, tensors))
    raise ConfigError(f"GGUF architecture {str(arch)[:40]!r} is not supported (expected 'gemma3' or 'gemma4'; "
                      f"a Gemma 4 drafter goes with --draft)")


def keys_are_values(meta: dict[str, Any], tensors: Iterable[str]) -> bool:
    """Whether a Gemma 4 GGUF's global layers (those that store K/V) lack `attn_v`: their keys double as values."""
    m = Meta(meta, "gemma4")
    n = m.get("num_layers", "block_count")
    flags = m.flags("attention.sliding_window_pattern", n) or [True] * n
    stores = n - m.get("num_kv_shared_layers", "attention.shared_kv_layers", 0)
    names = set(tensors)
    has_v = {f"blk.{i}.attn_v.weight" in names for i in range(min(n, max(stores, 0))) if not flags[i]}
    if len(has_v) > 1:
        raise WeightsError("some global layers have attn_v and others not: keys double as values on every global "
                           "layer or on none")
    return has_v == {False}


def _period_types(n: int, period: int) -> tuple[str, ...]:
    """llama_hparams::set_swa_pattern: layer i slides iff period == 0 or i % period < period - 1."""
    return tuple("sliding_attention" if period == 0 or i % period < period - 1 else "full_attention"
                 for i in range(n))


def gemma3_config(meta: dict[str, Any]) -> TextConfig:
    m = Meta(meta, "gemma3")
    layers = m.get("num_layers", "block_count")
    heads = m.get("num_heads", "attention.head_count")
    hidden = m.get("hidden_size", "embedding_length")
    head_dim = m.get("head_dim", "attention.key_length", 256)
    if m.get("head_dim", "attention.value_length", head_dim) != head_dim:
        raise ConfigError("GGUF key_length and value_length differ; Gemma 3 uses one head_dim")
    kw: dict[str, Any] = dict(
        hidden_size=hidden, intermediate_size=m.get("intermediate_size", "feed_forward_length"),
        num_layers=layers, num_heads=heads, num_kv_heads=m.get("num_kv_heads", "attention.head_count_kv"),
        head_dim=head_dim, max_position_embeddings=m.get("max_position_embeddings", "context_length"),
        rms_norm_eps=m.get("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-6),
        # llama.cpp's scale: 1/sqrt(key_length), the 27B (62 layers) 1/sqrt(hidden / heads)
        query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim))
    window = meta.get("gemma3.attention.sliding_window", 0)
    if window == 0:  # no sliding window: every layer global (llama.cpp's converter omits the key then)
        kw["layer_types"] = ("full_attention",) * layers
    else:
        kw["sliding_window"] = m.get("sliding_window", "attention.sliding_window")
        flags = m.flags("attention.sliding_window_pattern", layers) if isinstance(
            meta.get("gemma3.attention.sliding_window_pattern"), np.ndarray) else None
        if flags is not None:
            kw["layer_types"] = tuple("sliding_attention" if f else "full_attention" for f in flags)
        else:
            period = meta.get("gemma3.attention.sliding_window_pattern", DEFAULT_PERIOD)
            if isinstance(period, bool) or not isinstance(period, int) or not 0 <= period <= 1024:
                raise ConfigError(f"GGUF gemma3.attention.sliding_window_pattern = {str(period)[:40]}: must be a "
                                  "period in [0, 1024] or a bool per layer")
            if period >= 1:
                kw["sliding_window_pattern"] = period
            else:
                kw["layer_types"] = _period_types(layers, period)
        kw["rope_local"] = Rope(m.get("theta", "rope.freq_base_swa", LOCAL_THETA))
    scale_type = meta.get("gemma3.rope.scaling.type", "none")
    if scale_type not in ("none", "linear"):
        raise ConfigError(f"GGUF gemma3.rope.scaling.type = {str(scale_type)[:40]!r}: only linear is supported")
    factor = m.get("factor", "rope.scaling.factor", 1.0) if scale_type == "linear" else 1.0
    kw["rope_global"] = Rope(m.get("theta", "rope.freq_base", 1_000_000.0), factor)
    kw["final_logit_softcapping"] = m.optional_float("final_logit_softcapping", "final_logit_softcapping")
    return TextConfig(**kw, **_token_ids(m, (1, 106)))


def gemma3_refusal(cfg: TextConfig) -> str | None:
    """Why llama.cpp's gemma3 keys cannot carry `cfg` (None when they can)."""
    expected = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
    if cfg.query_pre_attn_scalar != expected:
        return (f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g} is not what llama.cpp's gemma3 reader derives "
                f"({expected}: key_length, or hidden / heads at 62 layers); no GGUF key carries it")
    if cfg.attn_logit_softcapping is not None:
        return "attn_logit_softcapping is set; llama.cpp's gemma3 reader has no attention soft-capping"
    if (cfg.rope_local.factor, cfg.rope_local.partial) != (1.0, 1.0):
        return "the sliding layers' RoPE is scaled or partial; no gemma3 key carries that"
    if cfg.rope_global.partial != 1.0:
        return "the global layers' RoPE is partial; no gemma3 key carries that"
    return None


def write_gemma3(w, cfg: TextConfig) -> None:
    """`gemma3.*` hyperparameters; ConfigError (before anything is written) for what no key expresses."""
    reason = gemma3_refusal(cfg)
    if reason:
        raise ConfigError(f"cannot write this model as a GGUF: {reason}")
    for key, value in (("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_heads), ("attention.head_count_kv", cfg.num_kv_heads),
                       ("attention.key_length", cfg.head_dim), ("attention.value_length", cfg.head_dim),
                       ("attention.sliding_window", cfg.sliding_window)):
        w.add_uint32(f"gemma3.{key}", value)
    flags = [s.sliding for s in cfg.layers]
    if flags != [t == "sliding_attention" for t in _period_types(cfg.num_layers, DEFAULT_PERIOD)]:
        w.add_array("gemma3.attention.sliding_window_pattern", flags)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32("gemma3.rope.freq_base", cfg.rope_global.theta)
    w.add_float32("gemma3.rope.freq_base_swa", cfg.rope_local.theta)
    if cfg.rope_global.factor != 1.0:
        w.add_string("gemma3.rope.scaling.type", "linear")
        w.add_float32("gemma3.rope.scaling.factor", cfg.rope_global.factor)
    if cfg.final_logit_softcapping is not None:
        w.add_float32("gemma3.final_logit_softcapping", cfg.final_logit_softcapping)


def _one(values: list, what: str) -> Any:
    if len(set(values)) > 1:
        raise ConfigError(f"GGUF per-layer {what} differ between layers of one kind: {sorted(set(values))}")
    return values[0]


def gemma4_config(meta: dict[str, Any], arch: str, partial: float = 1.0, k_eq_v: bool = False,
                  drafter: bool = False, **extra: Any) -> Gemma4TextConfig:
    """A Gemma 4 (or drafter backbone) config; `partial` comes from `rope_freqs.weight`, `k_eq_v` from the
    absence of `attn_v` on global layers (the loader reads both from the tensor table). A drafter's layers all
    read the target's K/V (the file says they all share); its config says none does (`model.gemma4.Drafter`)."""
    m = Meta(meta, arch)
    n = m.get("num_layers", "block_count")
    flags = m.flags("attention.sliding_window_pattern", n)
    if flags is None:
        raise ConfigError(f"GGUF metadata is missing {arch}.attention.sliding_window_pattern")
    if flags[-1]:
        raise ConfigError("GGUF sliding_window_pattern makes the last layer sliding; Gemma 4's last layer is global")
    kinds = ["sliding" if f else "global" for f in flags]
    shared = m.get("num_kv_shared_layers", "attention.shared_kv_layers", 0)
    if drafter:
        if shared not in (0, n):
            raise ConfigError(f"GGUF {arch}.attention.shared_kv_layers = {shared}: a drafter's layers all read the "
                              f"target's K/V ({n})")
        shared = 0
    if meta.get(m.key("embedding_length_per_layer_input"), 0) not in (0,):
        raise ConfigError(f"GGUF {arch}.embedding_length_per_layer_input is not 0: per-layer embeddings (E2B/E4B) "
                          "are not supported")
    if meta.get(m.key("expert_count"), 0) not in (0,):
        raise ConfigError(f"GGUF {arch}.expert_count is set: mixture-of-experts Gemma 4 is not supported")
    heads = _one(m.per_layer("num_heads", "attention.head_count", n), "attention.head_count")
    kv = m.per_layer("num_kv_heads", "attention.head_count_kv", n)
    kv_local = _one([k for k, t in zip(kv, kinds) if t == "sliding"] or [kv[0]], "sliding head_count_kv")
    kv_global = _one([k for k, t in zip(kv, kinds) if t == "global"], "global head_count_kv")
    k_eq_v = k_eq_v or (drafter and kv_global != kv_local)  # a drafter has no K/V projections to tell
    if not k_eq_v and kv_global != kv_local:
        raise ConfigError("GGUF gives global layers their own KV head count but they have values of their own "
                          "(attn_v); Gemma 4 has that only with keys doubling as values")
    ff = m.per_layer("intermediate_size", "feed_forward_length", n)
    first_shared = n - shared
    double = shared > 0 and all(f == 2 * ff[0] for f in ff[first_shared:]) and ff[first_shared] != ff[0]
    _one(ff[:first_shared] + ([f // 2 for f in ff[first_shared:]] if double else ff[first_shared:]),
         "feed_forward_length")
    head_dim = m.get("head_dim", "attention.key_length_swa")
    global_dim = m.get("global_head_dim", "attention.key_length")
    for name, want in (("attention.value_length_swa", head_dim), ("attention.value_length", global_dim),
                       ("rope.dimension_count_swa", head_dim), ("rope.dimension_count", global_dim)):
        if m.has(name) and m.get("head_dim", name) != want:
            raise ConfigError(f"GGUF {arch}.{name} = {m.get('head_dim', name)}: Gemma 4 uses {want} "
                              f"(values as wide as keys, RoPE over the whole head)")
    kw: dict[str, Any] = dict(
        vocab_size=extra.pop("vocab_size", 262_144), hidden_size=m.get("hidden_size", "embedding_length"),
        intermediate_size=ff[0], num_layers=n, num_heads=heads, num_kv_heads=kv_local, head_dim=head_dim,
        global_head_dim=global_dim, num_global_kv_heads=kv_global if k_eq_v else None, attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=shared, double_wide_mlp=double,
        sliding_window=m.get("sliding_window", "attention.sliding_window"),
        max_position_embeddings=m.get("max_position_embeddings", "context_length", 262_144),
        rms_norm_eps=m.get("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-6),
        final_logit_softcapping=m.optional_float("final_logit_softcapping", "final_logit_softcapping"),
        layer_types=tuple("sliding_attention" if f else "full_attention" for f in flags),
        rope_global=Rope(m.get("theta", "rope.freq_base", 1_000_000.0), partial=partial),
        rope_local=Rope(m.get("theta", "rope.freq_base_swa", LOCAL_THETA)))
    kw.update(_token_ids(m, (1, 106, 50)))
    return Gemma4TextConfig(**kw, **extra)


def write_gemma4(w, cfg: Gemma4TextConfig, arch: str = "gemma4") -> None:
    """`{arch}.*` hyperparameters as llama.cpp's Gemma4Model converter writes them (a drafter's: every layer
    shares the target's K/V)."""
    if cfg.rope_local.partial != 1.0 or cfg.rope_local.factor != 1.0 or cfg.rope_global.factor != 1.0:
        raise ConfigError("cannot write this model as a GGUF: scaled or partial RoPE on sliding layers")
    specs = cfg.layers
    flags = [s.sliding for s in specs]
    for key, value in (("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_layers), ("attention.head_count", cfg.num_heads),
                       ("attention.key_length", cfg.global_head_dim), ("attention.value_length", cfg.global_head_dim),
                       ("attention.key_length_swa", cfg.head_dim), ("attention.value_length_swa", cfg.head_dim),
                       ("attention.sliding_window", cfg.sliding_window),
                       ("attention.shared_kv_layers", cfg.num_layers if arch in DRAFTER_ARCHS
                        else cfg.num_kv_shared_layers),
                       ("embedding_length_per_layer_input", 0), ("rope.dimension_count", cfg.global_head_dim),
                       ("rope.dimension_count_swa", cfg.head_dim)):
        w.add_uint32(f"{arch}.{key}", value)
    wide = [cfg.intermediate_size * (2 if cfg.double_wide_mlp and s.kv_source is not None else 1) for s in specs]
    if len(set(wide)) == 1:
        w.add_uint32(f"{arch}.feed_forward_length", wide[0])
    else:
        w.add_array(f"{arch}.feed_forward_length", wide)
    w.add_array(f"{arch}.attention.head_count_kv", [s.num_kv_heads for s in specs])
    w.add_array(f"{arch}.attention.sliding_window_pattern", flags)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_global.theta)
    w.add_float32(f"{arch}.rope.freq_base_swa", cfg.rope_local.theta)
    if cfg.final_logit_softcapping is not None:
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_logit_softcapping)


def rope_freqs(cfg: Gemma4TextConfig) -> np.ndarray:
    """`rope_freqs.weight`: llama.cpp's encoding of proportional RoPE as NeoX frequency divisors over the whole
    global head (conversion/gemma.py, Gemma4Model.generate_extra_tensors): 1 for each rotated pair, 1e30 (a
    frequency of ~0) for the rest."""
    rotated = int(cfg.global_head_dim * cfg.rope_global.partial / 2)
    return np.array([1.0] * rotated + [1e30] * (cfg.global_head_dim // 2 - rotated), dtype=np.float32)


def partial_from_rope_freqs(values: np.ndarray, global_head_dim: int) -> float:
    """The partial rotary factor `rope_freqs.weight` encodes; anything but ones then huge divisors is refused."""
    if values.shape != (global_head_dim // 2,):
        raise ConfigError(f"rope_freqs.weight has shape {values.shape}, expected ({global_head_dim // 2},)")
    rotated = int(np.argmax(values != 1.0)) if (values != 1.0).any() else len(values)
    if not (values[rotated:] >= 1e29).all() or rotated == 0:
        raise ConfigError("rope_freqs.weight is not proportional RoPE (ones, then divisors of at least 1e29); "
                          "other frequency factors are not supported")
    return 2 * rotated / global_head_dim


def drafter_config(meta: dict[str, Any], partial: float = 1.0) -> tuple[Gemma4TextConfig, int]:
    """A drafter GGUF's backbone config and the width of the target it was made for (`embedding_length_out`;
    an older variant names it `n_embd_backbone`)."""
    arch = meta.get("general.architecture")
    if arch not in DRAFTER_ARCHS:
        raise ConfigError(f"GGUF architecture {str(arch)[:40]!r} is not a Gemma 4 drafter "
                          f"(expected {' or '.join(DRAFTER_ARCHS)})")
    m = Meta(meta, arch)
    name = "embedding_length_out" if m.has("embedding_length_out") else "n_embd_backbone"
    backbone = m.get("hidden_size", name)
    if m.has("nextn_predict_layers") and m.get("num_layers", "nextn_predict_layers") != m.get("num_layers",
                                                                                              "block_count"):
        raise ConfigError(f"GGUF {arch}.nextn_predict_layers must equal block_count: every layer drafts")
    return gemma4_config(meta, arch, partial, drafter=True), backbone


def write_drafter(w, cfg: Gemma4TextConfig, backbone: int, arch: str = "gemma4-assistant") -> None:
    write_gemma4(w, cfg, arch)
    w.add_uint32(f"{arch}.embedding_length_out", backbone)
    w.add_uint32(f"{arch}.nextn_predict_layers", cfg.num_layers)
