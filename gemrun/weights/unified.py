"""`gemrun convert` for Gemma 4 Unified: an HF directory <-> llama.cpp's three GGUFs (text model, `--mmproj` with
the image and audio projectors, `--draft SRC OUT` for the MTP assistant), streamed tensor by tensor. GGUF
block types come from the `gguf` package's reference quantizers, so a QAT checkpoint's unquantized weights give
back the QAT blocks under `--quant q4_0`. GGUF -> HF writes the names `save_pretrained` writes."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Gemma4TextConfig, gemma4_from_hf_config
from ..errors import ConfigError, WeightsError
from ..model.gemma4 import MediaConfig, media_from_hf_config
from . import gemma4_gguf as layout
from .gemma4_write import tokenizer_meta, write_drafter_file, write_media, write_text
from .gguf import GGUFFile, check_tokenizer_metadata
from .load import suppress_tokens
from .names import gemma4_hf_to_gemrun
from .safetensors import SafetensorsCheckpoint, ShardWriter

log = logging.getLogger("gemrun.convert")
Progress = Callable[[int, int], None]
HF_FLOATS = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@dataclass
class Model4:
    """A Gemma 4 Unified checkpoint read tensor by tensor: `shapes` by gemrun name (`text.*`, `media.*`), `read`
    giving float32 in the HF convention."""

    config: Gemma4TextConfig
    media: MediaConfig | None
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    tok_meta: dict


@dataclass
class Drafter4:
    config: Gemma4TextConfig
    backbone: int
    centroids: tuple[int, int] | None
    shapes: dict[str, tuple[int, ...]]  # by `Drafter` name
    read: Callable[[str], torch.Tensor]


def _hf_config(root: Path) -> dict:
    try:
        raw = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {root / 'config.json'}: {e}") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{root / 'config.json'} is not a JSON object")
    return raw


def handles(src: Path) -> bool:
    """Whether SRC is a Gemma 4 checkpoint (this module converts it) rather than a Gemma 3 one."""
    if src.is_file():
        try:
            return layout.is_gemma4(GGUFFile(src).metadata)
        except WeightsError:
            return False
    if not (src / "config.json").is_file():
        return False
    raw = _hf_config(src)
    kind = (raw.get("text_config") or raw).get("model_type") or raw.get("model_type")
    return isinstance(kind, str) and kind.startswith("gemma4")


def hf_model(root: Path) -> Model4:
    raw = _hf_config(root)
    if str(raw.get("model_type", "")).endswith("_assistant"):
        raise ConfigError(f"{root} is an MTP assistant: convert it with --draft SRC OUT beside its model")
    cfg = gemma4_from_hf_config(raw).replace(suppress_token_ids=suppress_tokens(root))
    try:
        media = media_from_hf_config(raw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"bad vision/audio config in {root / 'config.json'}: {e}") from None
    ckpt = SafetensorsCheckpoint(root)
    names = {}
    for name in ckpt.shapes:
        ours = gemma4_hf_to_gemrun(name)
        if ours is not None and not (ours.startswith("media.") and media is None):
            names[ours] = name
    return Model4(cfg, media, {o: tuple(ckpt.shapes[n]) for o, n in names.items()},
                  lambda ours: next(ckpt.tensors([names[ours]]))[1].float(), tokenizer_meta(root))


def gguf_model(path: Path, mmproj: Path | None) -> Model4:
    g = GGUFFile(path)
    check_tokenizer_metadata(g.metadata)
    cfg, names = layout.text_layout(g)
    shapes = {o: tuple(g.tensors[n].shape) for o, n in names.items()}
    media = None
    if mmproj is not None:
        m = layout.mmproj_layout(GGUFFile(mmproj), cfg)
        ids = layout.media_token_ids(layout.tokenizer(g.metadata))
        media = dataclasses.replace(m.config, **ids)
        shapes |= {"media." + ours: shape for ours, shape in m.shapes.items()}

    def read(ours: str) -> torch.Tensor:
        if ours.startswith("media."):
            return m.read(ours.removeprefix("media."))
        t = torch.from_numpy(g.load(names[ours]))
        g.release(names[ours])
        return t

    tok_meta = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    return Model4(cfg, media, shapes, read, tok_meta)


def hf_drafter(root: Path) -> Drafter4:
    raw = _hf_config(root)
    if not str(raw.get("model_type", "")).endswith("_assistant"):
        raise WeightsError(f"{root} is not a Gemma 4 assistant (drafter) checkpoint")
    cfg = gemma4_from_hf_config(dict(raw.get("text_config") or {}, num_kv_shared_layers=0))
    centroids = ((raw.get("num_centroids", 2048), raw.get("centroid_intermediate_top_k", 32))
                 if raw.get("use_ordered_embeddings") else None)
    ckpt = SafetensorsCheckpoint(root)
    names = {n.removeprefix("model."): n for n in ckpt.shapes if not n.startswith("lm_head.")}

    def read(ours: str) -> torch.Tensor:
        t = next(ckpt.tensors([names[ours]]))[1]
        return t if ours == "masked_embedding.token_ordering" else t.float()

    return Drafter4(cfg, int(raw.get("backbone_hidden_size", 3840)), centroids,
                    {o: tuple(ckpt.shapes[n]) for o, n in names.items()}, read)


def gguf_drafter(path: Path) -> Drafter4:
    g = GGUFFile(path)
    d = layout.drafter_layout(g)

    def read(ours: str) -> torch.Tensor:
        if ours == "masked_embedding.token_ordering":
            return layout.token_ordering(g, d.names[ours], d.config.vocab_size)
        return torch.from_numpy(g.load(d.names[ours]))

    return Drafter4(d.config, d.backbone, d.centroids, {o: tuple(g.tensors[n].shape) for o, n in d.names.items()},
                    read)


# --- HF directories ---------------------------------------------------------------------------------------------

def hf_name(ours: str) -> str:
    """The name `save_pretrained` gives a gemrun `text.*` / `media.*` tensor."""
    if ours.startswith("text."):
        return "model.language_model." + ours.removeprefix("text.")
    rest = ours.removeprefix("media.")
    if rest.startswith("embed_vision.multimodal_embedder."):
        return "model.embed_vision." + rest.removeprefix("embed_vision.multimodal_embedder.")
    if rest.startswith("embed_vision."):
        return "model.vision_embedder." + rest.removeprefix("embed_vision.")
    return "model." + rest


def _tokenizer_files(meta: dict, cfg: Gemma4TextConfig, out: Path) -> None:
    t = layout.tokenizer(meta)
    t.backend.save(str(out / "tokenizer.json"))
    tcfg = {"bos_token": t.id_to_token(t.bos_id), "eos_token": t.id_to_token(t.eos_id),
            "pad_token": t.id_to_token(t.pad_id), "add_bos_token": False}  # Gemma 4's template writes <bos>
    if t.chat_template:
        tcfg["chat_template"] = t.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    gen = {"eos_token_id": list(cfg.stop_token_ids)}
    if cfg.suppress_token_ids:
        gen["suppress_tokens"] = list(cfg.suppress_token_ids)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def write_hf(m: Model4, out: Path, quant: str, progress: Progress | None = None) -> Path:
    from .random import gemma4_config_dict

    out.mkdir(parents=True, exist_ok=True)
    shards = ShardWriter(out)
    for i, ours in enumerate(m.shapes):
        shards.put(hf_name(ours), m.read(ours).to(HF_FLOATS[quant]))
        if progress:
            progress(i + 1, len(m.shapes))
    shards.close()
    config = gemma4_config_dict(m.config, m.media)
    config["torch_dtype"] = str(HF_FLOATS[quant]).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer_files(m.tok_meta, m.config, out)
    return out


def write_hf_drafter(d: Drafter4, out: Path, quant: str) -> Path:
    from .random import gemma4_config_dict

    out.mkdir(parents=True, exist_ok=True)
    shards = ShardWriter(out)
    for ours in d.shapes:
        t = d.read(ours)
        top = ours.startswith(("pre_projection", "post_projection", "masked_embedding"))
        shards.put(ours if top else "model." + ours, t if not t.is_floating_point() else t.to(HF_FLOATS[quant]))
    shards.close()
    text = gemma4_config_dict(d.config, None)["text_config"] | {"num_kv_shared_layers": d.config.num_layers}
    count, top_k = d.centroids or (2048, 32)
    config = {"architectures": ["Gemma4UnifiedAssistantForCausalLM"], "model_type": "gemma4_unified_assistant",
              "backbone_hidden_size": d.backbone, "use_ordered_embeddings": d.centroids is not None,
              "num_centroids": count, "centroid_intermediate_top_k": top_k, "tie_word_embeddings": True,
              "text_config": text, "torch_dtype": str(HF_FLOATS[quant]).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# --- the command ------------------------------------------------------------------------------------------------

def convert(src: Path, out: Path, quant: str, embed_quant: str | None = None, mmproj: Path | None = None,
            mmproj_quant: str = "f16", draft: tuple[Path, Path] | None = None,
            progress: Progress | None = None) -> Path:
    """HF directory -> GGUF (OUT `.gguf`; `mmproj` and `draft[1]` are written too) or GGUF -> HF directory
    (`mmproj` and `draft[0]` are read). On failure no output is left behind."""
    to_gguf = out.suffix == ".gguf"
    if src.is_file() == to_gguf:
        raise ConfigError("Gemma 4 converts between an HF directory and GGUFs: give a .gguf OUT for an HF SRC, "
                          "an HF directory OUT for a GGUF SRC")
    if to_gguf and draft is not None and draft[1].suffix != ".gguf":
        raise ConfigError("--draft SRC OUT: OUT must be a .gguf next to a .gguf model")
    if not to_gguf and quant not in HF_FLOATS:
        raise ConfigError(f"Gemma 4 HF output is {', '.join(HF_FLOATS)}; got {quant!r}")
    outputs = [p for p in (out, mmproj, draft[1] if draft else None) if p is not None and to_gguf]
    start = time.time()
    try:
        if to_gguf:
            m = hf_model(src)
            text = {o.removeprefix("text."): s for o, s in m.shapes.items() if o.startswith("text.")}
            write_text(out, m.config, text, lambda o, s, q: m.read("text." + o).numpy(), m.tok_meta, quant,
                       embed_quant, progress)
            if mmproj is not None:
                if m.media is None:
                    raise ConfigError("--mmproj: the source has no image or audio embedders")
                media = {o.removeprefix("media."): s for o, s in m.shapes.items() if o.startswith("media.")}
                write_media(mmproj, m.media, m.config.hidden_size, media,
                            lambda o, s, q: m.read("media." + o).numpy(), mmproj_quant)
            elif m.media is not None:
                log.warning("the image and audio embedders are not written: give --mmproj FILE to write them")
            if draft is not None:
                d = hf_drafter(draft[0])
                d_meta = tokenizer_meta(draft[0]) if (draft[0] / "tokenizer.json").is_file() else m.tok_meta
                write_drafter_file(draft[1], d.config.replace(suppress_token_ids=m.config.suppress_token_ids),
                                   d.backbone, d.centroids, d.shapes, lambda o, s, q: d.read(o).numpy(), d_meta,
                                   quant, embed_quant)
        else:
            write_hf(gguf_model(src, mmproj), out, quant, progress)
            if draft is not None:
                write_hf_drafter(gguf_drafter(draft[0]), draft[1], quant)
    except BaseException:
        for p in outputs:  # the files this call wrote (a refusal of the drafter leaves no text model either)
            if p.is_file() and p.stat().st_mtime >= start - 1:
                p.unlink()
        raise
    return out
