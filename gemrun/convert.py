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

The quantized HF layout is `quant/hf.py`'s; the GGUF writing helpers are `weights/gguf_write.py`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.quants import dequantize

from .config import TextConfig, from_hf_config
from .errors import ConfigError, WeightsError
from .model.vision import VisionConfig, vision_from_hf_config
from .quant.hf import HF_QUANTS, QUANT_FILE, quantize_fp8, quantize_int4
from .weights.gguf_config import gemma3_config, gemma3_refusal, write_gemma3
from .weights.gguf_write import (
    GGUF_FILE_TYPES,
    GGUF_QUANTS,
    IMAGE_TOKENS,
    add_tokenizer_metadata,
    gguf_name,
    gguf_type_for,
    gguf_vocab,
    tokenizer_meta_from_dir,
    write_file,
)
from .weights.mmproj import MMPROJ_QUANTS
from .weights.names import GGUF_NAME_OF, gguf_to_gemrun, hf_to_gemrun, hf_vision_to_gemrun, is_gemma_norm
from .weights.safetensors import ShardWriter

log = logging.getLogger("gemrun.convert")
Progress = Callable[[int, int], None]

HF_FLOATS = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
DEFAULT_KEEP = ("embed_tokens.weight",)  # the sensitive matrix: tied embedding and output head (norms are vectors)


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
    cfg = gemma3_config(g.metadata).replace(vocab_size=g.tensors[GGUF_NAME_OF["embed_tokens.weight"]].shape[0])

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
    reason = gemma3_refusal(src.config)  # before any file is made
    if reason:
        raise ConfigError(f"cannot write this model as a GGUF: {reason}")
    meta = gguf_vocab(src.tokenizer_meta or tokenizer_meta_from_dir(src.tokenizer_dir))
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    plan = []
    for ours, shape in src.shapes.items():
        if ours == "embed_tokens.weight" and shape[0] > n_vocab:
            shape = (n_vocab, *shape[1:])  # HF pads Gemma 3's to 262208 rows; llama.cpp sizes it by the vocabulary
        plan.append((ours, shape, gguf_type_for(ours, shape, quant, embed_quant)))

    def add_metadata(w: GGUFWriter) -> None:
        write_gemma3(w, src.config)
        add_tokenizer_metadata(w, meta)
        w.add_file_type(GGUF_FILE_TYPES[quant])

    def data(i: int) -> np.ndarray:
        ours, shape, _ = plan[i]
        t = src.read(ours).numpy()[:shape[0]]
        return t + 1.0 if is_gemma_norm(ours) else t  # llama.cpp stores Gemma's (1 + w)

    write_file(out, "gemma3", add_metadata, [(gguf_name(o), s, q) for o, s, q in plan], data, progress)
    if mmproj is not None:
        from .weights.mmproj import write_mmproj

        try:
            write_mmproj(mmproj, src.vision, src.vision_shapes, src.read, mmproj_quant)
        except BaseException:
            out.unlink(missing_ok=True)
            mmproj.unlink(missing_ok=True)
            raise
    return out


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
            mmproj_quant: str = "f16", progress: Progress | None = None,
            draft: tuple[Path, Path] | None = None) -> Path:
    """SRC (GGUF file or HF directory) -> OUT: a `.gguf` path writes GGUF, anything else an HF directory.
    `mmproj` is the vision file: written from an HF source's vision tower next to a GGUF OUT (in `mmproj_quant`),
    read next to a GGUF source to give an HF OUT its vision tower. Gemma 4 Unified checkpoints go to their own
    converter (`weights/unified.py`: image and audio projectors in the mmproj, `draft` = (assistant SRC, OUT))."""
    from .weights import unified

    if unified.handles(src):
        return unified.convert(src, out, quant, embed_quant, mmproj, mmproj_quant, draft, progress)
    if draft is not None:
        raise ConfigError("--draft converts a Gemma 4 MTP assistant next to its Gemma 4 model")
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
