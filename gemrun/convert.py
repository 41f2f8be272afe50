"""`gemrun convert`: HF directories and GGUF files in both directions, and HF -> HF with quantized tensors.

Everything streams tensor by tensor: a source tensor is read, converted and written before the next is read, so
peak memory stays near the largest tensor. GGUF block types come from the `gguf` package's own quantizers (Q8_0,
Q4_0, ... bit for bit: what keeps a QAT checkpoint's quality); Q4_K, which it only dequantizes, from our port of
llama.cpp's `quantize_row_q4_K_ref`. GGUF files follow llama.cpp's converter: the same tensor names, norms stored
as 1 + w, the tokenizer as `tokenizer.ggml.*` arrays and the chat template in `tokenizer.chat_template`, so
llama.cpp loads them. A multimodal model's vision tower and projector go to a separate llama.cpp-style mmproj GGUF
(`--mmproj`, `weights/mmproj.py`) and come back from one into an HF directory.

What stays in higher precision: vectors (norms) are never quantized; the embedding, which Gemma 3 ties to the
output head, is kept (bf16 in HF schemes, Q8_0 under 4/5-bit GGUF types) unless `keep` / `embed_quant` say
otherwise; the vision tower is carried through HF schemes unquantized (it is small next to the text model and
feeds every image token).

HF quantized directories (`int4-channel`, `int4-block`, `fp8`) hold, per quantized matrix `W`:
- int4: `W.qweight` (uint8, two values per byte, low nibble first, q + 8 for q in -8..7) and `W.scales`
  (float16, one per output channel or per group), weight = q * scale;
- fp8: `W.weight` (float8_e4m3fn) and `W.weight_scale` (float32, one per tensor or per output channel).
`gemrun_quant.json` names the scheme, the group size and the tensors kept in higher precision.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from .config import TextConfig, from_gguf_metadata, from_hf_config
from .errors import ConfigError, WeightsError
from .model.vision import VisionConfig, vision_from_hf_config
from .weights.mmproj import MMPROJ_QUANTS
from .weights.names import GGUF_GLOBAL, GGUF_LAYER, gguf_to_gemrun, hf_to_gemrun, hf_vision_to_gemrun, is_gemma_norm
from .weights.safetensors import ShardWriter

log = logging.getLogger("gemrun.convert")
Progress = Callable[[int, int], None]

GGUF_QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
               "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q4_k": Q.Q4_K}
GGUF_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 14, "bf16": 32}
HF_FLOATS = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
HF_QUANTS = ("int4-channel", "int4-block", "fp8")
QUANT_FILE = "gemrun_quant.json"
DEFAULT_KEEP = ("embed_tokens.weight",)  # the sensitive matrix: tied embedding and output head (norms are vectors)
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


@dataclass
class Source:
    """A checkpoint read tensor by tensor: gemrun text names -> shapes (and `Gemma3Vision` names -> shapes for a
    vision tower), and a reader giving float32 in HF's convention (Gemma norms as w, not 1 + w)."""

    config: TextConfig
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    tokenizer_meta: dict = field(default_factory=dict)  # tokenizer.ggml.* arrays and ids, chat template
    tokenizer_dir: Path | None = None  # an HF source's directory (tokenizer files copied as they are)
    vision: VisionConfig | None = None
    vision_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def open_source(src: Path, mmproj: Path | None = None) -> Source:
    """A GGUF file (with its mmproj file, if given) or an HF directory (with its vision tower, if any)."""
    if src.is_file():
        return _gguf_source(src, mmproj)
    if mmproj is not None:
        raise ConfigError("an HF source carries its own vision tower: --mmproj names a file to write only when OUT "
                          "is a GGUF")
    if (src / "config.json").is_file():
        return _hf_source(src)
    raise WeightsError(f"{src} is neither a GGUF file nor an HF directory with config.json")


def _gguf_source(path: Path, mmproj: Path | None = None) -> Source:
    from .weights.gguf import GGUFFile
    from .weights.mmproj import mmproj_tensor, open_mmproj

    g = GGUFFile(path)
    names = {}
    for name in g.tensors:
        ours = gguf_to_gemrun(name)
        if ours is None:
            raise WeightsError(f"GGUF tensor {name!r} is not part of a Gemma 3 text model")
        names[ours] = name
    cfg = from_gguf_metadata(g.metadata).replace(vocab_size=g.tensors[GGUF_NAME_OF["embed_tokens.weight"]].shape[0])

    def read(ours: str) -> torch.Tensor:
        info = g.tensors[names[ours]]
        t = torch.from_numpy(np.array(dequantize(g.raw(info.name), info.qtype), dtype=np.float32).reshape(info.shape))
        g.release(info.name)
        return t - 1 if is_gemma_norm(ours) else t

    meta = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    source = Source(cfg, {o: tuple(g.tensors[n].shape) for o, n in names.items()}, read, meta)
    if mmproj is not None:
        v, vcfg, vnames = open_mmproj(mmproj, cfg)
        tokens = list(meta["tokenizer.ggml.tokens"])
        missing = [t for t in IMAGE_TOKENS[:2] if t not in tokens]
        if missing:
            raise WeightsError(f"the GGUF tokenizer lacks {', '.join(missing)}: it cannot go with an mmproj")
        # an mmproj names no token ids; <image_soft_token> is not in GGUF vocabularies and is appended after them
        image = tokens.index(IMAGE_TOKENS[2]) if IMAGE_TOKENS[2] in tokens else len(tokens)
        source.vision = replace(vcfg, boi_token_id=tokens.index(IMAGE_TOKENS[0]),
                                eoi_token_id=tokens.index(IMAGE_TOKENS[1]), image_token_id=image)
        source.vision_shapes = {o: tuple(v.tensors[n].shape) for o, n in vnames.items()}
        source.read = lambda ours: mmproj_tensor(v, vnames[ours]) if ours in vnames else read(ours)
    return source


def _hf_source(root: Path) -> Source:
    from .weights.safetensors import SafetensorsCheckpoint

    raw = json.loads((root / "config.json").read_text())
    if (root / QUANT_FILE).is_file():
        raise WeightsError(f"{root} is already quantized ({QUANT_FILE}); convert from its float checkpoint")
    cfg, vision = from_hf_config(raw), vision_from_hf_config(raw)
    ckpt = SafetensorsCheckpoint(root)
    names, vnames = {}, {}
    for name in ckpt.shapes:
        ours = hf_to_gemrun(name)
        if ours is not None:
            names[ours] = name
        elif vision is not None and (image := hf_vision_to_gemrun(name)) is not None:
            vnames[image] = name

    def read(ours: str) -> torch.Tensor:
        return next(ckpt.tensors([names.get(ours) or vnames[ours]]))[1].float()

    return Source(cfg, {o: tuple(ckpt.shapes[n]) for o, n in names.items()}, read, tokenizer_dir=root,
                  vision=vision, vision_shapes={o: tuple(ckpt.shapes[n]) for o, n in vnames.items()})


GGUF_NAME_OF = {v: k for k, v in GGUF_GLOBAL.items()}


def gguf_name(ours: str) -> str:
    """llama.cpp's name of a gemrun text tensor."""
    if ours in GGUF_NAME_OF:
        return GGUF_NAME_OF[ours]
    _, n, rest = ours.split(".", 2)
    return f"blk.{n}.{ {v: k for k, v in GGUF_LAYER.items()}[rest.rsplit('.', 1)[0]]}.weight"


def add_gemma3_metadata(w: GGUFWriter, cfg: TextConfig) -> None:
    for key, value in (("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_heads), ("attention.head_count_kv", cfg.num_kv_heads),
                       ("attention.key_length", cfg.head_dim), ("attention.value_length", cfg.head_dim),
                       ("attention.sliding_window", cfg.sliding_window)):
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32("gemma3.rope.freq_base", cfg.rope_global.theta)
    if cfg.rope_global.factor != 1.0:
        w.add_string("gemma3.rope.scaling.type", "linear")
        w.add_float32("gemma3.rope.scaling.factor", cfg.rope_global.factor)


def tokenizer_meta_from_dir(root: Path) -> dict:
    """`tokenizer.ggml.*` for an HF directory. From `tokenizer.model` (sentencepiece) when present, as llama.cpp's
    converter does: pieces, scores and types as stored. Else from `tokenizer.json`: pieces by id, byte tokens
    type 6, special added tokens 3 (control), other added tokens 4, the rest 1 (normal) scored by their rank,
    which is the merge priority sentencepiece's BPE scores encode."""
    from .tokenizer import from_directory

    tok = from_directory(root)
    if (root / "tokenizer.model").is_file() and not (root / "tokenizer.json").is_file():
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # parsing only: no pickle, no code

        proto = sp_pb2.ModelProto()
        proto.ParseFromString((root / "tokenizer.model").read_bytes())
        tokens = [p.piece for p in proto.pieces]
        scores = [float(p.score) for p in proto.pieces]
        types = [int(p.type) for p in proto.pieces]
    else:
        n = tok.vocab_size
        tokens = [tok.id_to_token(i) or f"<unused_id_{i}>" for i in range(n)]
        added = tok.backend.get_added_tokens_decoder()
        types, scores, rank = [], [], 0
        for i, t in enumerate(tokens):
            if i in added:
                types.append(3 if added[i].special else 4)
                scores.append(-1000.0)
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types.append(6)
                scores.append(0.0)
            else:
                types.append(1)
                scores.append(-float(rank))
                rank += 1
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
            "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.add_bos_token": tok.add_bos}
    unk = tok.token_to_id("<unk>")
    if unk is not None:
        meta["tokenizer.ggml.unknown_token_id"] = unk
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def add_tokenizer_metadata(w: GGUFWriter, meta: dict) -> None:
    w.add_tokenizer_model(str(meta.get("tokenizer.ggml.model", "llama")))
    w.add_tokenizer_pre(str(meta.get("tokenizer.ggml.pre", "default")))
    w.add_token_list(list(meta["tokenizer.ggml.tokens"]))
    w.add_token_scores([float(s) for s in meta["tokenizer.ggml.scores"]])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_bos_token_id(int(meta.get("tokenizer.ggml.bos_token_id", 2)))
    w.add_eos_token_id(int(meta.get("tokenizer.ggml.eos_token_id", 1)))
    w.add_unk_token_id(int(meta.get("tokenizer.ggml.unknown_token_id", 3)))
    w.add_pad_token_id(int(meta.get("tokenizer.ggml.padding_token_id", 0)))
    w.add_add_bos_token(bool(meta.get("tokenizer.ggml.add_bos_token", True)))
    w.add_add_eos_token(bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    w.add_add_space_prefix(bool(meta.get("tokenizer.ggml.add_space_prefix", False)))  # Gemma: no "▁" prefix
    if meta.get("tokenizer.chat_template"):
        w.add_chat_template(str(meta["tokenizer.chat_template"]))


def gguf_type_for(ours: str, shape: tuple[int, ...], quant: str, embed_quant: str | None) -> Q:
    """Vectors stay F32; the embedding takes `embed_quant` (default: Q8_0 under 4- and 5-bit types, as in
    llama.cpp's files). A matrix whose rows do not split into blocks falls back as llama.cpp's quantizer does:
    Q4_K (256-value super-blocks; Gemma 3 270M's and 1B's 640 and 1152 wide inputs) to Q5_0, anything else to
    F16."""
    from gguf import GGML_QUANT_SIZES

    if len(shape) == 1:
        return Q.F32
    if ours == "embed_tokens.weight":
        name = embed_quant or (quant if quant in ("f32", "f16", "bf16", "q8_0") else "q8_0")
    else:
        name = quant
    for q in (GGUF_QUANTS[name], Q.Q5_0) if name == "q4_k" else (GGUF_QUANTS[name],):
        if shape[-1] % GGML_QUANT_SIZES[q][0] == 0:
            return q
    return Q.F16


def encode_gguf(t: np.ndarray, q: Q) -> np.ndarray:
    """A float32 array in GGUF type `q`: the `gguf` package's reference quantizers, ours for Q4_K."""
    if q == Q.F32:
        return t.astype(np.float32)
    if q == Q.F16:
        return t.astype(np.float16)
    if q == Q.Q4_K:
        return quantize_q4_k(t)
    return quantize(np.ascontiguousarray(t, dtype=np.float32), q)


QK_K = 256  # values per K-quant super-block


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
          nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's `make_qkx2_quants` for rows of `x` (S, n) with importance `w`: an asymmetric grid
    x ~ scale * l + min, l in 0..nmax, min <= 0. Starts from the min/max grid, then tries 21 stretched grids,
    each fitted by weighted least squares, keeping the lowest weighted error; as in the C code, a better fit's
    min becomes the offset of the grids tried after it. Returns (scale, -min), each (S,)."""
    hi = x.amax(1)
    mn = x.amin(1).clamp(max=0)
    flat = hi == mn
    sum_w, sum_x = w.sum(1), (w * x).sum(1)

    def grid(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)

    def span() -> torch.Tensor:
        return (hi - mn).clamp(min=1e-30)

    scale = span() / nmax
    best = (w * (scale[:, None] * grid(nmax / span()) + mn[:, None] - x) ** 2).sum(1)
    for i in range(nstep + 1):
        lv = grid((rmin + rdelta * i + nmax) / span())
        sum_l, sum_l2, sum_xl = (w * lv).sum(1), (w * lv * lv).sum(1), (w * lv * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the grid must reach down to 0: refit the scale alone through the origin
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale[:, None] * lv + this_min[:, None] - x) ** 2).sum(1)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale, mn = torch.where(better, this_scale, scale), torch.where(better, this_min, mn)
    return torch.where(flat, torch.zeros_like(scale), scale), -mn


def quantize_q4_k(t: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """float32 (..., K) with K % 256 == 0 -> GGML block_q4_K bytes (..., K / 256 * 144), as llama.cpp's
    `quantize_row_q4_K_ref` (no importance matrix) computes them. A block: fp16 d and dmin, then 12 bytes of
    eight 6-bit (scale, min) pairs, then 128 bytes of 4-bit quants; sub-block j of 32 values decodes to
    d * sc_j * q - dmin * m_j. Each sub-block is fitted by `_qkx2` with weights |x| + rms(sub-block), the eight
    scales and mins are quantized to 6 bits against their maxima, and the quants recomputed on that grid."""
    x = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).reshape(-1, 8, 32)
    out = torch.empty(x.shape[0], 144, dtype=torch.uint8)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = _q4_k_blocks(x[s:s + chunk])
    return out.numpy().reshape(*t.shape[:-1], t.shape[-1] // QK_K * 144)


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]  # x: (B, 8, 32)
    w = x.abs() + x.pow(2).mean(-1, keepdim=True).sqrt()
    scales, mins = (v.reshape(b, 8) for v in _qkx2(x.reshape(-1, 32), w.reshape(-1, 32)))
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    ls = torch.round(scales * torch.where(max_scale > 0, 63 / max_scale, 0)).clamp(max=63).to(torch.uint8)
    lm = torch.round(mins * torch.where(max_min > 0, 63 / max_min, 0)).clamp(max=63).to(torch.uint8)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    step, offset = d.float() * ls, dmin.float() * lm  # (B, 8): what the decoder will use, fp16 rounding included
    q = torch.round((x + offset[..., None]) / torch.where(step > 0, step, 1)[..., None]).clamp(0, 15)
    q = torch.where(step[..., None] > 0, q, 0).to(torch.uint8).reshape(b, 4, 2, 32)
    packed = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                        (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4], dim=1)  # (B, 12)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), packed,
                      (q[:, :, 0] | q[:, :, 1] << 4).reshape(b, 128)], dim=1)


def gguf_vocab(meta: dict) -> dict:
    """Tokenizer metadata as llama.cpp's vocabularies hold it: without a trailing `<image_soft_token>` (HF's
    multimodal tokenizers append it past the 262144 sentencepiece pieces; gemrun appends it again when an mmproj
    is loaded)."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    if len(tokens) > 1 and tokens[-1] == IMAGE_TOKENS[2]:
        meta = dict(meta)
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            meta[key] = list(meta[key])[:-1]
    return meta


def write_gguf(src: Source, out: Path, quant: str, embed_quant: str | None = None,
               progress: Progress | None = None, mmproj: Path | None = None, mmproj_quant: str = "f16") -> Path:
    """A Gemma 3 text GGUF, and with `mmproj` the vision tower's mmproj GGUF in `mmproj_quant`."""
    if quant not in GGUF_QUANTS or (embed_quant and embed_quant not in GGUF_QUANTS):
        raise ConfigError(f"GGUF types are {', '.join(GGUF_QUANTS)}; got {quant!r}")
    if mmproj is not None and src.vision is None:
        raise ConfigError("--mmproj: the source has no vision tower")
    if mmproj is not None and mmproj_quant not in MMPROJ_QUANTS:
        raise ConfigError(f"mmproj types are {', '.join(MMPROJ_QUANTS)}; got {mmproj_quant!r}")
    if mmproj is None and src.vision is not None:
        log.warning("the vision tower is not written: give --mmproj FILE to write it as an mmproj GGUF")
    meta = gguf_vocab(src.tokenizer_meta or tokenizer_meta_from_dir(src.tokenizer_dir))
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(out), "gemma3")
    add_gemma3_metadata(w, src.config)
    add_tokenizer_metadata(w, meta)
    w.add_file_type(GGUF_FILE_TYPES[quant])
    plan = []
    for ours, shape in src.shapes.items():
        if ours == "embed_tokens.weight" and shape[0] > n_vocab:
            shape = (n_vocab, *shape[1:])  # HF pads Gemma 3's to 262208 rows; llama.cpp sizes it by the vocabulary
        q = gguf_type_for(ours, shape, quant, embed_quant)
        plan.append((ours, shape, q))
        w.add_tensor_info(gguf_name(ours), _byte_shape(shape, q), np.dtype(np.uint8), gguf_nbytes(shape, q),
                          raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (ours, shape, q) in enumerate(plan):
        t = src.read(ours).numpy()[:shape[0]]
        if is_gemma_norm(ours):
            t = t + 1.0  # llama.cpp stores Gemma's (1 + w)
        w.write_tensor_data(np.ascontiguousarray(encode_gguf(t, q)).view(np.uint8).reshape(-1))
        if progress:
            progress(i + 1, len(plan))
    w.close()
    if mmproj is not None:
        from .weights.mmproj import write_mmproj

        write_mmproj(mmproj, src.vision, src.vision_shapes, src.read, mmproj_quant)
    return out


def gguf_nbytes(shape: tuple[int, ...], q: Q) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[q]
    return int(np.prod(shape)) // block * size


def _byte_shape(shape: tuple[int, ...], q: Q) -> tuple[int, ...]:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[q]
    return (*shape[:-1], shape[-1] // block * size)


# --- HF output -----------------------------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of `group` inputs (group = K: per output channel): (packed uint8 (N, K/2),
    float16 scales (N, K/group)); q = round(w / scale) in -8..7 with scale = max|w| / 7 (rounded to fp16 first,
    so dequantizing is exact)."""
    n, k = w.shape
    if k % group or group % 2:
        raise ConfigError(f"group size {group} does not divide the {k} inputs of a matrix into even groups")
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(-1) / 7).clamp(min=2**-24).to(torch.float16)
    q = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int16) + 8
    q = q.reshape(n, k).to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float() - 8
    n, k = q.shape
    return (q.reshape(n, scales.shape[1], -1) * scales.float()[..., None]).reshape(n, k)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) values 0..15 (low nibble first)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn with a float32 scale per tensor or per output channel: weight = fp8 * scale."""
    amax = w.abs().amax(-1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w.float() * scale.float()


def _kept(ours: str, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(ours, pat) for pat in keep)


def write_hf(src: Source, out: Path, quant: str, group: int = 32, fp8_per_channel: bool = True,
             keep: tuple[str, ...] = DEFAULT_KEEP, shard_bytes: int = 2 << 30,
             progress: Progress | None = None) -> Path:
    """An HF directory: config.json, sharded safetensors (+ index), tokenizer files; quantized schemes also
    write `gemrun_quant.json`. A vision tower is written in the float dtype (bf16 under quantized schemes), with
    the multimodal config and the hub's names (`language_model.model.*`, `vision_tower.vision_model.*`,
    `multi_modal_projector.*`)."""
    from .weights.random import hf_config_dict

    if quant not in HF_FLOATS and quant not in HF_QUANTS:
        raise ConfigError(f"HF output types are {', '.join([*HF_FLOATS, *HF_QUANTS])}; got {quant!r}")
    out.mkdir(parents=True, exist_ok=True)
    float_dtype = HF_FLOATS.get(quant, torch.bfloat16)
    shards = ShardWriter(out, shard_bytes)
    put = shards.put
    kept, quantized = [], []
    prefix = "language_model.model." if src.vision else "model."
    total = len(src.shapes) + len(src.vision_shapes)

    for i, (ours, shape) in enumerate(src.shapes.items()):
        t = src.read(ours)
        base = prefix + ours.removesuffix(".weight")
        if quant in HF_QUANTS and len(shape) == 2 and not _kept(ours, keep):
            quantized.append(ours)
            if quant == "fp8":
                q, scale = quantize_fp8(t, fp8_per_channel)
                put(base + ".weight", q)
                put(base + ".weight_scale", scale)
            else:
                q, scale = quantize_int4(t, shape[1] if quant == "int4-channel" else group)
                put(base + ".qweight", q)
                put(base + ".scales", scale)
        else:
            if quant in HF_QUANTS and len(shape) == 2:
                kept.append(ours)
            put(prefix + ours, t.to(float_dtype))
        if progress:
            progress(i + 1, total)
    for i, ours in enumerate(src.vision_shapes, len(src.shapes)):
        put(ours.replace("vision_tower.", "vision_tower.vision_model.", 1), src.read(ours).to(float_dtype))
        if progress:
            progress(i + 1, total)
    shards.close()
    config = hf_config_dict(src.config, src.vision)
    config["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if quant in HF_QUANTS:
        scheme = {"format": "gemrun", "scheme": quant, "kept": kept, "quantized": len(quantized)}
        if quant == "int4-block":
            scheme["group_size"] = group
        if quant == "fp8":
            scheme["fp8_scales"] = "per-channel" if fp8_per_channel else "per-tensor"
        if src.vision:
            scheme["vision"] = "unquantized"
        (out / QUANT_FILE).write_text(json.dumps(scheme, indent=2))
    _write_tokenizer(src, out)
    return out


def _write_tokenizer(src: Source, out: Path) -> None:
    import shutil

    from .tokenizer import from_gguf_metadata

    if src.tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json", "generation_config.json"):
            if (src.tokenizer_dir / name).is_file() and src.tokenizer_dir.resolve() != out.resolve():
                shutil.copyfile(src.tokenizer_dir / name, out / name)
        return
    meta = src.tokenizer_meta
    tok = from_gguf_metadata(meta, image_token=src.vision is not None)
    tok.backend.save(str(out / "tokenizer.json"))
    ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    cfg = {k: tok.id_to_token(v) for k, v in ids.items()} | {"add_bos_token": tok.add_bos}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def convert(src: Path, out: Path, quant: str, group: int = 32, fp8_per_channel: bool = True,
            keep: tuple[str, ...] = DEFAULT_KEEP, embed_quant: str | None = None, mmproj: Path | None = None,
            mmproj_quant: str = "f16", progress: Progress | None = None) -> Path:
    """SRC (GGUF file or HF directory) -> OUT: a `.gguf` path writes GGUF, anything else an HF directory.
    `mmproj` is the vision file: written from an HF source's vision tower next to a GGUF OUT (in `mmproj_quant`),
    read next to a GGUF source to give an HF OUT its vision tower."""
    if src.is_file() and mmproj is not None and out.suffix == ".gguf":
        raise ConfigError("GGUF -> GGUF: the mmproj file is used as it is (--mmproj goes with HF SRC or OUT)")
    source = open_source(src, mmproj if src.is_file() else None)
    if out.suffix == ".gguf":
        if quant in HF_QUANTS:
            raise ConfigError(f"{quant} is an HF safetensors scheme; GGUF output takes {', '.join(GGUF_QUANTS)}")
        return write_gguf(source, out, quant, embed_quant, progress, mmproj, mmproj_quant)
    if quant in GGUF_QUANTS and quant not in HF_FLOATS:
        raise ConfigError(f"{quant} is a GGUF block type: give OUT a .gguf name")
    if mmproj is not None and not src.is_file():
        raise ConfigError("--mmproj with an HF SRC goes with a .gguf OUT; an HF OUT carries the vision tower")
    return write_hf(source, out, quant, group, fp8_per_channel, keep, progress=progress)


# --- loading HF quantized directories ------------------------------------------------------------------------

def read_scheme(root: Path) -> dict | None:
    path = root / QUANT_FILE
    if not path.is_file():
        return None
    try:
        scheme = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(scheme, dict) or scheme.get("scheme") not in HF_QUANTS:
        raise WeightsError(f"{path}: not a known quantization scheme ({', '.join(HF_QUANTS)})")
    return scheme


def quantized_parts(names: Iterator[str]) -> dict[str, tuple[str, str]]:
    """Checkpoint tensor names -> {matrix weight name: (values tensor, scales tensor)} of a quantized directory."""
    names = set(names)
    parts = {}
    for n in names:
        if n.endswith(".qweight") and n.removesuffix(".qweight") + ".scales" in names:
            parts[n.removesuffix(".qweight") + ".weight"] = (n, n.removesuffix(".qweight") + ".scales")
        elif n.endswith(".weight_scale") and n.removesuffix("_scale") in names:
            parts[n.removesuffix("_scale")] = (n.removesuffix("_scale"), n)
    return parts


_warned: set[str] = set()


def quantized_module(scheme: dict, values: torch.Tensor, scales: torch.Tensor, packed: bool):
    """An `Int4Linear` for int4 groups that are whole multiples of 32 (exact: weight = q * scale with fp16 scales;
    per channel is the same scale in every group), else the float weight (dequantized on load, with a warning)."""
    from .quant import packed as P

    if scheme["scheme"] == "fp8":
        if "fp8" not in _warned:
            _warned.add("fp8")
            log.warning("fp8 weights have no packed kernel here: dequantized on load")
        return dequantize_fp8(values, scales)
    group = values.shape[1] * 2 // scales.shape[1]
    if packed and group % P.GROUP == 0:
        s = scales.float().repeat_interleave(group // P.GROUP, dim=1)
        return P.Int4Linear.from_quants(unpack_int4(values), s, -8 * s)
    if packed and "int4" not in _warned:
        _warned.add("int4")
        log.warning("int4 groups of %d have no packed kernel (multiples of 32 do): dequantized on load", group)
    return dequantize_int4(values, scales)
