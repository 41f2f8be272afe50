"""Model configuration: frozen dataclasses, named presets, and the reader of HF config.json (GGUF metadata is
read and written in `weights/gguf_config.py`).

The decoder is described per layer (`LayerSpec`) so that families whose layers differ in head size, KV heads or
KV sharing (Gemma 4) fit the same cache and attention code as Gemma 3.

(Over 400 lines: the presets of every Gemma size are data, kept with the dataclasses they fill.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Sane maxima, far above every Gemma (27B: 62 layers, 5376 wide, 32 heads; 262k vocabulary; 128k context), so that
# a lying config.json or GGUF is refused here instead of asking for billions of layers or terabytes of weights.
MAX_VOCAB = 1 << 22
INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, MAX_VOCAB), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1024), "num_heads": (1, 1024), "num_kv_heads": (1, 1024), "head_dim": (1, 4096),
    "sliding_window": (1, 1 << 22), "sliding_window_pattern": (1, 1024), "max_position_embeddings": (2, 1 << 22),
    "pad_token_id": (0, MAX_VOCAB - 1), "eos_token_id": (0, MAX_VOCAB - 1), "bos_token_id": (0, MAX_VOCAB - 1),
    "global_head_dim": (1, 4096), "num_global_kv_heads": (1, 1024), "num_kv_shared_layers": (0, 1023),
    "image_size": (1, 1 << 14), "patch_size": (1, 1 << 10), "pooling": (1, 1 << 10),
}
# low < value <= high (finite: NaN and infinities fail the comparison). A RoPE base at or below 1, a tiny scaling
# factor or attention scalar overflow float32 (a base of 1e-45 makes the frequencies infinite): refused too.
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 0.1), "query_pre_attn_scalar": (1e-3, 1e6), "final_logit_softcapping": (0.0, 1e6),
    "attn_logit_softcapping": (0.0, 1e6), "theta": (1.0, 1e12), "factor": (1e-3, 1e4), "partial": (0.0, 1.0),
}
OPTIONAL = {"final_logit_softcapping", "attn_logit_softcapping", "num_global_kv_heads"}  # None: off / as local


def check_field(name: str, value: Any, label: str | None = None) -> Any:
    """`value` checked for field `name`'s type and range (INT_RANGES, FLOAT_RANGES); floats come back as float.
    The error names `label` (the key in the file it came from) or the field."""
    label = label or f"config field {name}"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{label} = {shown}: must be an integer in [{lo}, {hi}]")
        return value
    lo, hi = FLOAT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
        raise ConfigError(f"{label} = {shown}: must be a finite number in ({lo:g}, {hi:g}]")
    return float(value)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type. `factor` is linear position scaling (inv_freq / factor); `partial` < 1
    is Gemma 4's proportional RoPE: only that fraction of the frequency slots rotate, the rest are zero."""

    theta: float
    factor: float = 1.0
    partial: float = 1.0

    def __post_init__(self) -> None:
        for name in ("theta", "factor", "partial"):
            check_field(name, getattr(self, name), f"rope {name}")


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer looks like: attention kind and the K/V geometry its cache stores."""

    sliding: bool
    head_dim: int
    num_kv_heads: int
    rope: Rope
    window: int | None  # keys seen by a query, itself included (None: all)
    kv_source: int | None = None  # layer whose cache this layer reads instead of writing its own
    k_eq_v: bool = False  # Gemma 4 global layers: values come from the key projection (no v_proj)


@dataclass(frozen=True)
class TextConfig:
    """The Gemma 3 text decoder (values as in transformers' Gemma3TextConfig; defaults are its defaults)."""

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" | "full_attention"; None: from the pattern
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    rope_global: Rope = field(default_factory=lambda: Rope(1_000_000.0))
    rope_local: Rope = field(default_factory=lambda: Rope(10_000.0))
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    stop_token_ids: tuple[int, ...] = (1, 106)  # <eos>, <end_of_turn>
    suppress_token_ids: tuple[int, ...] = ()  # never sampled (generation_config suppress_tokens)
    name: str = "gemma3"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.name in INT_RANGES or f.name in FLOAT_RANGES) and not (value is None and f.name in OPTIONAL):
                check_field(f.name, value)
        for field_name in ("stop_token_ids", "suppress_token_ids"):
            ids = getattr(self, field_name)
            if not isinstance(ids, tuple) or len(ids) > 1024:
                raise ConfigError(f"config field {field_name} must be a tuple of at most 1024 token ids")
            for t in ids:
                check_field("eos_token_id", t, f"config field {field_name}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = sorted({repr(t)[:40] for t in self.layer_types if t not in ("sliding_attention", "full_attention")})
            if bad:
                raise ConfigError(f"unknown layer types {', '.join(bad)}")

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        types = self.layer_types or tuple(
            "full_attention" if (i + 1) % self.sliding_window_pattern == 0 else "sliding_attention"
            for i in range(self.num_layers)
        )
        return tuple(
            LayerSpec(sliding=True, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads, rope=self.rope_local,
                      window=self.sliding_window)
            if t == "sliding_attention"
            else LayerSpec(sliding=False, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
                           rope=self.rope_global, window=None)
            for t in types
        )

    def replace(self, **changes: Any) -> TextConfig:
        return dataclasses.replace(self, **changes)

    def parameter_count(self) -> int:
        """Parameters of the text decoder (embedding tied to the head), from the config alone."""
        e = self.hidden_size
        return self.vocab_size * e + e + sum(self._layer_parameters(spec) for spec in self.layers)

    def _layer_parameters(self, spec: LayerSpec) -> int:
        e, d, kv = self.hidden_size, spec.head_dim, spec.num_kv_heads
        attention = 2 * e * self.num_heads * d + 2 * e * kv * d + 2 * d  # q, o, k, v; q and k norms
        return attention + 3 * e * self.intermediate_size + 4 * e  # gated MLP; the four block norms

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> dict[str, int]:
        """K and V bytes one token adds to each kind of layer cache (layers that share KV store nothing)."""
        out = {"sliding": 0, "global": 0}
        for spec in self.layers:
            if spec.kv_source is None:
                out["sliding" if spec.sliding else "global"] += round(2 * spec.num_kv_heads * spec.head_dim
                                                                      * dtype_bytes)
        return out

    def kv_cache_bytes(self, context: int, dtype_bytes: float = 2) -> int:
        """Cache size holding `context` tokens: sliding layers keep at most `window` positions, global ones all."""
        total = 0
        for spec in self.layers:
            if spec.kv_source is not None:
                continue
            kept = context if spec.window is None else min(context, spec.window)
            total += round(kept * 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes)
        return total


@dataclass(frozen=True)
class Gemma4TextConfig(TextConfig):
    """The Gemma 4 (Unified) text decoder, as transformers' Gemma4UnifiedTextConfig: global layers have their own
    head size and KV heads, keys double as values there (`attention_k_eq_v`), the last layer is always global,
    and the last `num_kv_shared_layers` layers reuse the K/V of the last earlier layer of their type."""

    vocab_size: int = 262_144
    sliding_window: int = 1024
    max_position_embeddings: int = 262_144
    global_head_dim: int = 512
    num_global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    double_wide_mlp: bool = False  # KV-sharing layers get a 2x wide MLP (E2B)
    # Image/video tokens attend to each other: "sliding" on sliding layers only (the documented intent, and the
    # reference's generate path), "all" on every layer (the reference's plain forward), None never.
    vision_attention: str | None = "sliding"
    rope_global: Rope = field(default_factory=lambda: Rope(1_000_000.0, partial=0.25))
    stop_token_ids: tuple[int, ...] = (1, 106, 50)  # <eos>, <turn|>, <|tool_response>
    name: str = "gemma4"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attention_k_eq_v", "double_wide_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name} = {getattr(self, name)!r}: must be true or false")
        if self.vision_attention not in (None, "sliding", "all"):
            raise ConfigError(f"vision_attention must be 'sliding', 'all' or None, got {self.vision_attention!r}")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ConfigError(f"num_kv_shared_layers {self.num_kv_shared_layers} is out of range")
        heads = self.num_global_kv_heads
        if heads is not None and self.num_heads % heads:
            raise ConfigError(f"num_global_kv_heads {heads} does not divide num_heads {self.num_heads}")

    def _layer_parameters(self, spec: LayerSpec) -> int:
        e, d, kv = self.hidden_size, spec.head_dim, spec.num_kv_heads
        attention = 2 * e * self.num_heads * d + d  # q and o projections, q norm
        if spec.kv_source is None:  # layers that share KV have no K/V weights; k = v has no v_proj
            attention += e * kv * d * (1 if spec.k_eq_v else 2) + d
        wide = 2 if self.double_wide_mlp and spec.kv_source is not None else 1
        return attention + 3 * e * self.intermediate_size * wide + 4 * e + 1  # MLP, block norms, layer scalar

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        types = list(self.layer_types or (
            "full_attention" if (i + 1) % self.sliding_window_pattern == 0 else "sliding_attention"
            for i in range(self.num_layers)))
        types[-1] = "full_attention"  # forced by the reference config
        return tuple(types)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        kinds = self.layer_kinds
        first_shared = self.num_layers - self.num_kv_shared_layers
        # a sharing layer reads the last non-sharing layer of its type ("store" in kv_sharing_modes)
        source = {kind: max(i for i in range(first_shared) if kinds[i] == kind) for kind in set(kinds)
                  if self.num_kv_shared_layers and kind in kinds[:first_shared]}
        specs = []
        for i, kind in enumerate(kinds):
            shared = source.get(kind) if i >= first_shared else None
            if i >= first_shared and shared is None:
                raise ConfigError(f"layer {i} ({kind}) shares KV but no earlier layer of that type stores it")
            if kind == "sliding_attention":
                specs.append(LayerSpec(True, self.head_dim, self.num_kv_heads, self.rope_local, self.sliding_window,
                                       shared))
            else:
                k_eq_v, global_kv = self.attention_k_eq_v, self.num_global_kv_heads
                kv = global_kv if k_eq_v and global_kv else self.num_kv_heads
                specs.append(LayerSpec(False, self.global_head_dim, kv, self.rope_global, None, shared,
                                       k_eq_v=self.attention_k_eq_v))
        return tuple(specs)


def _gemma3(**kw: Any) -> TextConfig:
    return TextConfig(**kw)


_SCALED = Rope(1_000_000.0, factor=8.0)  # 4B/12B/27B global layers: linear scaling x8

PRESETS: dict[str, TextConfig] = {
    "gemma-3-270m": _gemma3(name="gemma-3-270m", vocab_size=262_144, hidden_size=640, intermediate_size=2048,
                            num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=512, max_position_embeddings=32_768),
    "gemma-3-1b": _gemma3(name="gemma-3-1b", vocab_size=262_144, hidden_size=1152, intermediate_size=6912,
                          num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256,
                          sliding_window=512, max_position_embeddings=32_768),
    "gemma-3-4b": _gemma3(name="gemma-3-4b", vocab_size=262_208, hidden_size=2560, intermediate_size=10240,
                          num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                          sliding_window=1024, max_position_embeddings=131_072, rope_global=_SCALED),
    "gemma-3-12b": _gemma3(name="gemma-3-12b", vocab_size=262_208, hidden_size=3840, intermediate_size=15360,
                           num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=1024, max_position_embeddings=131_072, rope_global=_SCALED),
    "gemma-3-27b": _gemma3(name="gemma-3-27b", vocab_size=262_208, hidden_size=5376, intermediate_size=21504,
                           num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168,
                           sliding_window=1024, max_position_embeddings=131_072, rope_global=_SCALED),
    "gemma-4-12b": Gemma4TextConfig(name="gemma-4-12b", hidden_size=3840, intermediate_size=15360, num_layers=48,
                                    num_heads=16, num_kv_heads=8, head_dim=256, global_head_dim=512,
                                    num_global_kv_heads=1, attention_k_eq_v=True, final_logit_softcapping=30.0),
}


def preset(name: str) -> TextConfig:
    """Exact lookup of a named preset."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def _rope_from(params: dict[str, Any] | None, default_theta: float, where: str = "rope_parameters") -> Rope:
    params = _expect(params or {}, dict, where)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "proportional"):
        raise ConfigError(f"unsupported rope_type {str(kind)[:40]!r}")

    def number(name: str, key: str, default: float) -> float:  # a default comes from a top-level key or is ours
        return check_field(name, params.get(key, default), f"config.json {where + '.' if key in params else ''}{key}")

    factor = number("factor", "factor", 1.0) if kind in ("linear", "proportional") else 1.0
    partial = number("partial", "partial_rotary_factor", 1.0) if kind == "proportional" else 1.0
    return Rope(number("theta", "rope_theta", default_theta), factor, partial)


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"config.json {where} must be {'an object' if kind is dict else 'a list'}, "
                          f"got {type(value).__name__}")
    return value


def _hf_fields(text: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Our fields from config.json keys (hf -> ours), each checked for type and range, errors naming the key."""
    kw = {}
    for hf, ours in names.items():
        value = text.get(hf)
        if value is not None:
            known = ours in INT_RANGES or ours in FLOAT_RANGES
            kw[ours] = check_field(ours, value, f"config.json {hf}") if known else value
    return kw


def _text_part(raw: dict[str, Any]) -> dict[str, Any]:
    return dict(_expect(raw.get("text_config") or raw, dict, "text_config"))


def _eos_ids(value: Any) -> tuple[int, ...]:
    ids = tuple(value) if isinstance(value, list) else (() if value is None else (value,))
    return tuple(check_field("eos_token_id", i, "config.json eos_token_id") for i in ids)


def from_hf_config(raw: dict[str, Any]) -> TextConfig:
    """Read a Gemma 3 text config from an HF `config.json` dict (official files and transformers 5.x dumps).

    Multimodal files nest the text part under `text_config`; unknown keys are ignored on purpose.
    """
    top = raw
    text = _text_part(raw)
    model_type = text.get("model_type") or top.get("model_type", "")
    if not isinstance(model_type, str):
        raise ConfigError("config.json model_type must be a string")
    if model_type.startswith("gemma4"):
        return gemma4_from_hf_config(raw)
    if model_type and not model_type.startswith("gemma3"):
        raise ConfigError(f"model_type {model_type!r} is not a Gemma 3 text model")
    defaults = TextConfig()
    names = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
             "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
             "query_pre_attn_scalar": "query_pre_attn_scalar", "sliding_window": "sliding_window",
             "sliding_window_pattern": "sliding_window_pattern",
             "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
             "final_logit_softcapping": "final_logit_softcapping", "attn_logit_softcapping": "attn_logit_softcapping",
             "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id"}
    kw = _hf_fields(text, names)
    if text.get("layer_types"):
        kw["layer_types"] = tuple(_expect(text["layer_types"], list, "layer_types"))
    rope = _expect(text.get("rope_parameters") or {}, dict, "rope_parameters")
    if "full_attention" in rope or "sliding_attention" in rope:
        kw["rope_global"] = _rope_from(rope.get("full_attention"), rope.get("rope_theta", 1_000_000.0),
                                       "rope_parameters.full_attention")
        kw["rope_local"] = _rope_from(rope.get("sliding_attention"), 10_000.0, "rope_parameters.sliding_attention")
    else:  # older files: rope_theta (global), rope_local_base_freq (local), rope_scaling (global only)
        scaling = text.get("rope_scaling") or rope
        kw["rope_global"] = _rope_from(scaling, text.get("rope_theta", defaults.rope_global.theta), "rope_scaling")
        kw["rope_local"] = Rope(check_field("theta", text.get("rope_local_base_freq", defaults.rope_local.theta),
                                            "config.json rope_local_base_freq"))
    eos_ids = _eos_ids(top.get("eos_token_id", text.get("eos_token_id")))
    if eos_ids:
        kw["eos_token_id"] = eos_ids[0]
    kw["stop_token_ids"] = tuple(dict.fromkeys((*eos_ids, 1, 106)))
    try:
        return TextConfig(**kw)
    except TypeError as e:
        raise ConfigError(f"bad config.json value: {e}") from None


def gemma4_from_hf_config(raw: dict[str, Any]) -> Gemma4TextConfig:
    """Gemma 4 (Unified) text config from `config.json` (the composite file or its `text_config`)."""
    text = _text_part(raw)
    names = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
             "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "global_head_dim": "global_head_dim",
             "num_global_key_value_heads": "num_global_kv_heads", "attention_k_eq_v": "attention_k_eq_v",
             "num_kv_shared_layers": "num_kv_shared_layers", "use_double_wide_mlp": "double_wide_mlp",
             "sliding_window": "sliding_window", "max_position_embeddings": "max_position_embeddings",
             "rms_norm_eps": "rms_norm_eps", "final_logit_softcapping": "final_logit_softcapping",
             "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id"}
    kw = _hf_fields(text, names)
    # files saved by transformers: the global shapes per layer
    overrides = _expect(text.get("per_layer_config") or {}, dict, "per_layer_config")
    if overrides:
        types = text.get("layer_types") or []
        try:
            shapes = {(o.get("head_dim"), o.get("num_key_value_heads")) for o in overrides.values()}
            wrong = any(types and types[int(i)] != "full_attention" for i in overrides)
        except (AttributeError, TypeError, ValueError, IndexError):
            raise ConfigError("config.json per_layer_config must map layer numbers to objects") from None
        if len(shapes) != 1 or wrong:
            raise ConfigError("per_layer_config must give every global layer the same shape, and only them")
        head_dim, kv_heads = shapes.pop()
        if head_dim is not None:
            kw["global_head_dim"] = head_dim
        if kv_heads is not None:
            kw["num_global_kv_heads"] = kv_heads
    if text.get("layer_types"):
        kw["layer_types"] = tuple(_expect(text["layer_types"], list, "layer_types")[:-1]) + ("full_attention",)
    bidirectional = text.get("use_bidirectional_attention", "vision")
    if bidirectional == "all":
        raise ConfigError("use_bidirectional_attention='all' (bidirectional text) is not a generative setting")
    if bidirectional != "vision":
        kw["vision_attention"] = None
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"unsupported hidden_activation {text['hidden_activation']!r}")
    rope = _expect(text.get("rope_parameters") or {}, dict, "rope_parameters")
    if rope.get("full_attention"):
        kw["rope_global"] = _rope_from(rope["full_attention"], 1_000_000.0, "rope_parameters.full_attention")
    if rope.get("sliding_attention"):
        kw["rope_local"] = _rope_from(rope["sliding_attention"], 10_000.0, "rope_parameters.sliding_attention")
    eos_ids = _eos_ids(raw.get("eos_token_id", text.get("eos_token_id")))
    if eos_ids:
        kw["eos_token_id"] = eos_ids[0]
    kw["stop_token_ids"] = tuple(dict.fromkeys((*eos_ids, 1, 106, 50)))
    try:
        return Gemma4TextConfig(**kw)
    except TypeError as e:
        raise ConfigError(f"bad config.json value: {e}") from None
