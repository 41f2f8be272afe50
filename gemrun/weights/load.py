"""Build a model from a checkpoint path (GGUF file or HF directory): strict, tensor by tensor, with progress.

(Over 400 lines because every source a model is built from passes the same `_fill` checks here: GGUF text,
Gemma 4 mmproj and drafter, HF directories, quantize-at-load; the format readers themselves live beside it.)"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import tokenizer as tok
from ..config import Gemma4TextConfig, TextConfig, check_field, from_hf_config, gemma4_from_hf_config
from ..errors import ConfigError, WeightsError
from ..files import config_json, json_file
from ..model.decoder import Decoder
from ..model.gemma3 import Gemma3
from ..model.gemma4 import Drafter, Gemma4, Gemma4Media, MediaConfig, media_from_hf_config
from ..model.vision import Gemma3Vision, VisionConfig, vision_from_hf_config
from ..processing.gemma4 import Gemma4Inputs
from ..processing.image import Gemma3Images, ImageConfig
from ..quant.hf import quantized_module, quantized_parts, read_scheme
from ..tokenizer import Tokenizer
from . import gemma4_gguf
from .gguf import GGUFFile, check_tokenizer_metadata
from .gguf_config import config_from_gguf
from .names import gemma4_hf_to_gemrun, gguf_to_gemrun, hf_to_gemrun, hf_vision_to_gemrun, is_gemma_norm
from .safetensors import SafetensorsCheckpoint

Progress = Callable[[int, int], None]  # (tensors done, tensors total)


@dataclass
class Loaded:
    model: Decoder  # Gemma3 or Gemma4
    config: TextConfig
    path: Path
    format: str  # "gguf" | "safetensors"
    gguf: GGUFFile | None = None  # kept open for the tokenizer metadata
    hf_config: dict | None = None
    vision: Gemma3Vision | None = None  # image encoder of multimodal checkpoints
    media: Gemma4Media | None = None  # Gemma 4 Unified: image/video and audio embedders
    tokenizer: Tokenizer | None = None
    inputs: object = None  # how media reach the model (prompt.MediaInput), None for text-only checkpoints
    drafter: Drafter | None = None  # a Gemma 4 MTP drafter for speculative decoding (`load_drafter`)
    packed: bool = False  # quantized matrices kept low-bit (a GGUF drafter is loaded the same way)


def check_names(expected: dict[str, tuple[int, ...]], provided: dict[str, tuple[int, ...]]) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    shaped = sorted(f"{n} {tuple(provided[n])} (expected {tuple(expected[n])})"
                    for n in set(expected) & set(provided) if tuple(expected[n]) != tuple(provided[n]))
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError("checkpoint does not match the model; " + "; ".join(problems))


Getter = Callable[[], torch.Tensor]  # reads one tensor when called
Packer = Callable[[str, Getter], "nn.Module | None"]  # a low-bit module for a tensor, or None to keep it dense


def _build(config: TextConfig, vision: VisionConfig | None, provided: dict[str, tuple[int, ...]],
           tensors: Iterator[tuple[str, Getter]], dtype: torch.dtype, device: torch.device,
           progress: Progress | None, pack: Packer | None = None, media: MediaConfig | None = None, shard=None):
    """Build the text model (names `text.*`) and the vision encoder (`vision.*`, Gemma 3) or media embedders
    (`media.*`, Gemma 4) on `meta`, check every name and shape, then fill them tensor by tensor; `pack` may swap
    in a low-bit module instead (quantization is module substitution). `shard` (a `shard.Shard`) builds one
    tensor-parallel rank's part: its config, its slice of each sharded matrix. Returns the ModuleDict of the parts."""
    plan = shard.plan(config, provided) if shard is not None else None
    model_config = plan.config if plan else config
    with torch.device("meta"):
        text = Gemma4(model_config) if isinstance(config, Gemma4TextConfig) else Gemma3(model_config)
        parts = nn.ModuleDict({"text": text} | ({"vision": Gemma3Vision(vision)} if vision else {})
                              | ({"media": Gemma4Media(media, config.hidden_size)} if media else {}))
    return _fill(parts, plan.shapes if plan else provided, tensors, dtype, device, progress, pack, plan)


def _fill(root: nn.Module, provided: dict[str, tuple[int, ...]], tensors: Iterator[tuple[str, Getter]],
          dtype: torch.dtype, device: torch.device, progress: Progress | None = None, pack: Packer | None = None,
          plan=None):
    """A module built on `meta`, checked name by name and shape by shape, then filled tensor by tensor (float
    tensors in `dtype`; buffers of integers, such as a token ordering, keep theirs). `plan` (`shard.Plan`) cuts
    this rank's slice of each sharded matrix."""
    check_names({n: tuple(p.shape) for n, p in [*root.named_parameters(), *root.named_buffers()]}, provided)
    weights = {n for n, _ in root.named_parameters()}
    state = {}

    def dense(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    for i, (name, get) in enumerate(tensors):
        module = pack(name, get) if pack else None
        if plan is not None:  # this rank's slice of a sharded matrix, as a module of its own
            module = plan.piece(name, module, get, dense)
        if module is not None:
            _swap(root, name.removesuffix(".weight"), module)
        else:
            t = get()
            if not t.is_floating_point() and name in weights:
                raise WeightsError(f"tensor {name!r} holds integers ({t.dtype}) where weights belong")
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if progress:
            progress(i + 1, len(provided))
        if i % 8 == 7:
            _trim()
    root.load_state_dict(state, strict=pack is None and plan is None, assign=True)
    _check_loaded(root)
    _trim()
    return root.to(device).eval().requires_grad_(False)


def _drop_vocabulary(meta: dict) -> None:
    """The tokenizer holds the vocabulary once built: drop the metadata's copy (~800k Python strings for a Gemma 4
    vocabulary, ~55 MB for Gemma 3's)."""
    for key in ("tokens", "scores", "token_type", "merges"):
        meta.pop(f"tokenizer.ggml.{key}", None)


def _trim() -> None:
    """Hand freed heap memory back to the OS: converting tensor after tensor leaves glibc holding the freed
    temporaries (a 12B's Q4_0 packing: 2 GB of resident memory beside 7.4 GB of weights), and so does building a
    tokenizer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def quantizer(kind: str) -> Packer:
    """`--quantize q4|q8` for float checkpoints: text matrices to 4-bit (min/max per group of 32) or 8-bit (Q8_0),
    the embedding to 8-bit rows; norms and the vision encoder stay in floating point."""
    from ..quant.packed import Int4Linear, Int8Embedding, Int8Linear

    if kind not in ("q4", "q8"):
        raise WeightsError(f"--quantize {kind!r} is not q4, q8 or none")

    def pack(name: str, get: Getter) -> nn.Module | None:
        if name == "text.embed_tokens.weight":
            return Int8Embedding.from_float(get())
        if name.startswith("text.") and name.endswith("proj.weight"):
            t = get()
            if kind == "q4" and t.shape[1] % 32 == 0 and t.shape[0] % 64 == 0:
                return Int4Linear.from_float(t)
            return Int8Linear.from_float(t)
        return None

    return pack


def _swap(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _check_loaded(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"tensors left unloaded: {', '.join(left[:8])}")


def gguf_packer(g: GGUFFile, names: dict[str, str]) -> Packer:
    """Quantized GGUF matrices stay low-bit: repacked for the CPU int4/int8 kernels (`quant/packed.py`), the
    embedding as int8 rows; float tensors (norms) stay dense."""
    from ..quant.packed import Int4Embedding, Int4Linear, Int8Embedding, int8_module, pack_gguf, repackable, repacked

    def pack(ours: str, get: Getter) -> nn.Module | None:
        info = g.tensors[names[ours]]
        if info.qtype.name in ("F32", "F16", "BF16"):
            return None
        embedding = ours.endswith("embed_tokens.weight")
        if not repackable(info.qtype, info.shape[-1], 4 if info.qtype.name == "Q4_0" else 8):
            g.check_finite(info.name)  # else checked as it is repacked
        raw = g.raw(info.name)
        try:
            if embedding and (m := repacked(raw, info.qtype, info.shape, Int4Linear)) is not None:
                module = Int4Embedding.of(m)  # a Q4_0 table stays 4-bit
            elif embedding:
                step = 8192  # dequantize in slices: the float table is never whole in memory

                def part(r: int, n: int, k: int) -> nn.Module:  # a slice of rows; the file's pages then let go
                    module = int8_module(raw[r:r + step], info.qtype, (min(step, n - r), k))
                    g.release(info.name, r * raw.shape[1], (r + step) * raw.shape[1])
                    return module

                n, k = info.shape
                module = Int8Embedding.from_parts(n, k, (part(r, n, k) for r in range(0, n, step)))
            elif len(info.shape) == 2 and ours.endswith(("proj.weight", "_projection.weight")):
                module = pack_gguf(raw, info.qtype, info.shape)
            else:
                return None
        except ValueError as e:  # non-finite scales found while repacking
            raise WeightsError(f"tensor {info.name!r}: {e}") from None
        g.release(info.name)
        return module

    return pack


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, progress: Progress | None = None,
              packed: bool = False, shard=None, image_token: bool = False) -> Loaded:
    """A GGUF text model, and its tokenizer (built first: once the weights' parallel kernels have run, their
    OpenMP threads may spin on a core the tokenizer's parsing would use). `image_token`: Gemma 3 with an mmproj."""
    g = GGUFFile(path)
    check_tokenizer_metadata(g.metadata)
    gemma4 = gemma4_gguf.is_gemma4(g.metadata)
    if gemma4:
        config, names = gemma4_gguf.text_layout(g)
    else:
        config, names = config_from_gguf(g.metadata), {}
        for name in g.tensors:
            ours = gguf_to_gemrun(name)
            if ours is None:
                raise WeightsError(f"GGUF tensor {name!r} is not part of a Gemma 3 text model")
            names["text." + ours] = name
        if "text.embed_tokens.weight" not in names:
            raise WeightsError("GGUF has no token_embd.weight")
        config = config.replace(vocab_size=g.tensors[names["text.embed_tokens.weight"]].shape[0])

    tokens = len(g.metadata["tokenizer.ggml.tokens"])
    if tokens > config.vocab_size:
        raise WeightsError(f"GGUF tokenizer has {tokens} tokens, more than the {config.vocab_size} rows of the token "
                           "embedding")
    tokenizer = (gemma4_gguf.tokenizer(g.metadata) if gemma4
                 else tok.from_gguf_metadata(g.metadata, image_token=image_token))
    _drop_vocabulary(g.metadata)
    _trim()  # parsing a 262k vocabulary leaves ~200 MB of freed heap behind
    pack = None
    if packed and any(t.qtype.name not in ("F32", "F16", "BF16") for t in g.tensors.values()):
        if device.type != "cpu":
            raise WeightsError("packed low-bit weights run on the CPU")
        pack = gguf_packer(g, names)

    def getter(name: str) -> Getter:
        def get() -> torch.Tensor:
            norm = is_gemma_norm(name) and not gemma4  # llama.cpp stores Gemma 3 norms as 1 + w; Gemma 4's as w
            t = torch.from_numpy(g.load(name)) - 1 if norm else g.load_as(name, dtype if shard is None else
                                                                           torch.float32)
            g.release(name)
            return t
        return get

    provided = {ours: g.tensors[name].shape for ours, name in names.items()}
    tensors = ((ours, getter(name)) for ours, name in names.items())
    parts = _build(config, None, provided, tensors, dtype, device, progress, pack, shard=shard)
    return Loaded(parts["text"], config, path, "gguf", gguf=g, packed=pack is not None, tokenizer=tokenizer)


def load_gemma4_mmproj(path: Path, text: Gemma4TextConfig, dtype: torch.dtype, device: torch.device) -> Gemma4Media:
    """The image and audio embedders of a Gemma 4 Unified mmproj GGUF (clip: gemma4uv + gemma4ua)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"mmproj file {path} does not exist")
    layout = gemma4_gguf.mmproj_layout(GGUFFile(path), text)
    with torch.device("meta"):
        media = Gemma4Media(layout.config, text.hidden_size)
    tensors = ((ours, lambda ours=ours: layout.read(ours)) for ours in layout.names)
    media = _fill(media, layout.shapes, tensors, dtype, device)
    layout.g.close()
    return media


def load_hf(root: Path, dtype: torch.dtype, device: torch.device, progress: Progress | None = None,
            quantize: str | None = None, packed: bool = True, shard=None) -> Loaded:
    """An HF directory; a quantized one (`gemrun convert`, `gemrun_quant.json`) keeps int4 groups packed on the
    CPU unless `packed` is False (then, like fp8, dequantized on load)."""
    raw = config_json(root)
    cfg_path = root / "config.json"
    config = from_hf_config(raw).replace(suppress_token_ids=suppress_tokens(root))
    gemma4 = isinstance(config, Gemma4TextConfig)
    vision = None if gemma4 else vision_from_hf_config(raw)
    try:
        media = media_from_hf_config(raw) if gemma4 else None
    except (TypeError, ValueError) as e:
        raise WeightsError(f"bad vision/audio config in {cfg_path}: {e}") from None
    ckpt = SafetensorsCheckpoint(root)
    scheme = read_scheme(root)
    parts = quantized_parts(ckpt.shapes) if scheme else {}
    companions = {n for pair in parts.values() for n in pair}
    shapes = {n: s for n, s in ckpt.shapes.items() if n not in companions}
    for weight, (values, _) in parts.items():  # a quantized matrix stands in as its float (N, K)
        n, k = ckpt.shapes[values]
        shapes[weight] = (n, k * 2 if values.endswith(".qweight") else k)
    names: dict[str, str] = {}
    for name in shapes:
        if gemma4:
            ours = gemma4_hf_to_gemrun(name)
            ours = None if ours and ours.startswith("media.") and media is None else ours
        else:
            text, image = hf_to_gemrun(name), hf_vision_to_gemrun(name)
            ours = "text." + text if text else ("vision." + image if image and vision else None)
        if ours is None:
            continue
        if ours in names:
            raise WeightsError(f"tensors {names[ours]!r} and {name!r} both map to {ours!r}")
        names[ours] = name
    provided = {ours: shapes[name] for ours, name in names.items()}
    if quantize and (device.type != "cpu" or dtype != torch.bfloat16):
        raise WeightsError("--quantize runs on the CPU with bfloat16 activations")
    if quantize and scheme:
        raise WeightsError(f"{root} is already quantized ({scheme['scheme']}); --quantize takes float checkpoints")

    def read(name: str) -> torch.Tensor:
        return next(ckpt.tensors([name]))[1]

    def getter(name: str) -> Getter:
        if name in parts:
            return lambda: quantized_module(scheme, *map(read, parts[name]), packed=False)
        return lambda: read(name)

    tensors = ((ours, getter(name)) for ours, name in names.items())
    pack = quantizer(quantize) if quantize else None
    if scheme and packed and device.type == "cpu":
        def pack(ours: str, get: Getter) -> nn.Module | None:
            name = names[ours]
            if name not in parts or scheme["scheme"] == "fp8":
                return None  # fp8: dequantized by the getter
            module = quantized_module(scheme, *map(read, parts[name]), packed=True)
            return module if isinstance(module, nn.Module) else None
    parts = _build(config, vision, provided, tensors, dtype, device, progress, pack, media, shard)
    return Loaded(parts["text"], config, root, "safetensors", hf_config=raw, vision=parts["vision"] if vision else None,
                  media=parts["media"] if media else None)


def suppress_tokens(root: Path) -> tuple[int, ...]:
    """`suppress_tokens` of a directory's generation_config.json (ids never to be sampled)."""
    ids = (json_file(root, "generation_config.json") or {}).get("suppress_tokens")
    if ids is None:
        return ()
    if not isinstance(ids, list) or len(ids) > 1024:
        raise ConfigError("generation_config.json suppress_tokens must be a list of at most 1024 token ids")
    return tuple(check_field("eos_token_id", i, "generation_config.json suppress_tokens") for i in ids)


def load_drafter(path: str | Path, dtype: torch.dtype, device: torch.device,
                 target: TextConfig | None = None, packed: bool = False) -> Drafter:
    """A Gemma 4 MTP assistant: an HF directory (`gemma4_unified_assistant`) or a GGUF (`gemma4-assistant`,
    `gemma4-mtp`; quantized matrices `packed` low-bit on the CPU), strict as the main loader; with `target`,
    checked to fit that model (a Gemma 4 of the width it was made for)."""
    if target is not None and not isinstance(target, Gemma4TextConfig):
        raise ConfigError("a drafter goes with a Gemma 4 model")
    root = Path(path).expanduser()
    if root.is_file():
        drafter = _drafter_gguf(root, dtype, device, packed and device.type == "cpu")
    else:
        drafter = _drafter_hf(root, dtype, device)
    if target is not None and drafter.pre_projection.in_features != 2 * target.hidden_size:
        raise ConfigError(f"the drafter was made for a {drafter.pre_projection.in_features // 2}-wide model, "
                          f"this one is {target.hidden_size}")
    if target is not None and drafter.config.vocab_size != target.vocab_size:
        raise ConfigError(f"the drafter has a vocabulary of {drafter.config.vocab_size}, the model "
                          f"{target.vocab_size}")
    return drafter


def _drafter_hf(root: Path, dtype: torch.dtype, device: torch.device) -> Drafter:
    raw = json_file(root, "config.json") if root.is_dir() else None
    if raw is None or not str(raw.get("model_type", "")).endswith("_assistant"):
        raise WeightsError(f"{root} is not a Gemma 4 assistant (drafter) checkpoint")
    text = dict(raw.get("text_config") or {}, num_kv_shared_layers=0)  # every layer reads the target's K/V
    config = gemma4_from_hf_config(text)
    centroids = None
    if raw.get("use_ordered_embeddings"):
        count = check_field("num_kv_heads", raw.get("num_centroids", 2048), "config.json num_centroids")
        top = check_field("num_kv_heads", raw.get("centroid_intermediate_top_k", 32),
                          "config.json centroid_intermediate_top_k")
        if config.vocab_size % count or top > count:
            raise ConfigError(f"{count} centroids (top {top}) do not divide the vocabulary of {config.vocab_size}")
        centroids = (count, top)
    ckpt = SafetensorsCheckpoint(root)
    names = {n.removeprefix("model."): n for n in ckpt.shapes if not n.startswith("lm_head.")}
    with torch.device("meta"):
        drafter = Drafter(config, check_field("hidden_size", raw.get("backbone_hidden_size", 3840),
                                              "config.json backbone_hidden_size"), centroids)
    tensors = ((ours, lambda n=n: next(ckpt.tensors([n]))[1]) for ours, n in names.items())
    return _fill(drafter, {ours: ckpt.shapes[n] for ours, n in names.items()}, tensors, dtype, device)


def _drafter_gguf(path: Path, dtype: torch.dtype, device: torch.device, packed: bool) -> Drafter:
    g = GGUFFile(path)
    layout = gemma4_gguf.drafter_layout(g)
    with torch.device("meta"):
        drafter = Drafter(layout.config, layout.backbone, layout.centroids)
    order = "masked_embedding.token_ordering"

    def get(ours: str) -> torch.Tensor:
        name = layout.names[ours]
        if ours == order:
            return gemma4_gguf.token_ordering(g, name, layout.config.vocab_size)
        t = torch.from_numpy(g.load(name))
        g.release(name)
        return t

    pack = gguf_packer(g, layout.names) if packed else None
    provided = {ours: g.tensors[n].shape for ours, n in layout.names.items()}
    tensors = ((ours, lambda ours=ours: get(ours)) for ours in layout.names)
    return _fill(drafter, provided, tensors, dtype, device, pack=pack)


def load_checkpoint(path: str | Path, dtype: torch.dtype, device: torch.device,
                    progress: Progress | None = None, mmproj: str | Path | None = None,
                    packed: bool = False, quantize: str | None = None, shard=None) -> Loaded:
    """The weights of a GGUF file (with a llama.cpp mmproj file for its vision tower) or an HF directory;
    `shard` loads one tensor-parallel rank's part of the text model."""
    p = Path(path).expanduser()
    if p.is_dir():
        if mmproj is not None:
            raise WeightsError("--mmproj goes with a GGUF model; an HF directory carries its own vision tower")
        return load_hf(p, dtype, device, progress, quantize, packed, shard)
    if p.is_file():
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise WeightsError(f"{p}: pickled checkpoints are never loaded; use safetensors or GGUF")
        if quantize:
            raise WeightsError("--quantize is for float HF checkpoints; a GGUF keeps its own quantization")
        loaded = load_gguf(p, dtype, device, progress, packed, shard, image_token=mmproj is not None)
        if mmproj is not None and isinstance(loaded.config, Gemma4TextConfig):
            loaded.media = load_gemma4_mmproj(Path(mmproj).expanduser(), loaded.config, dtype, device)
        elif mmproj is not None:
            from .mmproj import load_mmproj

            loaded.vision = load_mmproj(Path(mmproj).expanduser(), loaded.config, dtype, device)
        return loaded
    raise WeightsError(f"model path {p} does not exist")


def attach_tokenizer(loaded: Loaded, pan_and_scan: bool = False) -> Loaded:
    """Give loaded weights their tokenizer (the GGUF's metadata or the directory's files) and, for multimodal
    checkpoints, the media input that feeds them (`pan_and_scan`: Gemma 3's default for large images)."""
    if loaded.gguf is not None and gemma4_gguf.is_gemma4(loaded.gguf.metadata):
        loaded.tokenizer = loaded.tokenizer or gemma4_gguf.tokenizer(loaded.gguf.metadata)
        if loaded.media is not None:  # an mmproj names no token ids: they are the tokenizer's
            ids = gemma4_gguf.media_token_ids(loaded.tokenizer)
            loaded.media.config = dataclasses.replace(loaded.media.config, **ids)
    elif loaded.gguf is not None and loaded.tokenizer is None:
        loaded.tokenizer = tok.from_gguf_metadata(loaded.gguf.metadata, image_token=loaded.vision is not None)
    if loaded.gguf is not None:
        _drop_vocabulary(loaded.gguf.metadata)
        if loaded.vision is not None:  # an mmproj file names no token ids: they are the tokenizer's
            ids = {f: loaded.tokenizer.token_to_id(t) for f, t in (("boi_token_id", "<start_of_image>"),
                                                                   ("eoi_token_id", "<end_of_image>"),
                                                                   ("image_token_id", "<image_soft_token>"))}
            if None in ids.values():
                raise ConfigError("the GGUF tokenizer lacks Gemma 3's image tokens; it cannot go with an mmproj")
            loaded.vision.config = dataclasses.replace(loaded.vision.config, **ids)
    else:
        loaded.tokenizer = tok.from_directory(loaded.path)
    if loaded.vision is not None:
        image_id = loaded.tokenizer.token_to_id("<image_soft_token>")
        if image_id != loaded.vision.config.image_token_id:
            raise ConfigError(f"tokenizer id of <image_soft_token> is {image_id}, the model expects "
                              f"{loaded.vision.config.image_token_id}")
        loaded.inputs = Gemma3Images(loaded.vision, ImageConfig(pan_and_scan=pan_and_scan))
    elif loaded.media is not None:
        loaded.inputs = Gemma4Inputs(loaded.media)
    _trim()  # the tokenizer metadata just dropped, or a tokenizer parsed here
    return loaded
