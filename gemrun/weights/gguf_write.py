"""Writing llama.cpp-layout GGUF files, shared by `gemrun convert`, the mmproj writers and random checkpoints:
llama.cpp's tensor names, the tokenizer as `tokenizer.ggml.*` arrays, tensors encoded block by block (the `gguf`
package's reference quantizers, ours for Q4_K), and whole files written so that a failure leaves none behind
(hyperparameters: `gguf_config.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from ..quant.q4k import quantize_q4_k
from .names import GGUF_LAYER_OF, GGUF_NAME_OF

GGUF_QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
               "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q4_k": Q.Q4_K}
GGUF_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 14, "bf16": 32}
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def gguf_name(ours: str) -> str:
    """llama.cpp's name of a gemrun text tensor."""
    if ours in GGUF_NAME_OF:
        return GGUF_NAME_OF[ours]
    _, n, rest = ours.split(".", 2)
    return f"blk.{n}.{GGUF_LAYER_OF[rest.rsplit('.', 1)[0]]}.weight"


def tokenizer_meta_from_dir(root: Path) -> dict:
    """`tokenizer.ggml.*` for an HF directory. From `tokenizer.model` (sentencepiece) when present, as llama.cpp's
    converter does: pieces, scores and types as stored. Else from `tokenizer.json`: pieces by id, byte tokens
    type 6, special added tokens 3 (control), other added tokens 4, the rest 1 (normal) scored by their rank,
    which is the merge priority sentencepiece's BPE scores encode."""
    from ..tokenizer import from_directory

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
    if meta.get("tokenizer.ggml.merges"):
        w.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    if meta.get("tokenizer.chat_template"):
        w.add_chat_template(str(meta["tokenizer.chat_template"]))


def gguf_type_for(ours: str, shape: tuple[int, ...], quant: str, embed_quant: str | None) -> Q:
    """Vectors stay F32; the embedding takes `embed_quant` (default: Q8_0 under 4- and 5-bit types, as in
    llama.cpp's files). A matrix whose rows do not split into blocks falls back as llama.cpp's quantizer does:
    Q4_K (256-value super-blocks; Gemma 3 270M's and 1B's 640 and 1152 wide inputs) to Q5_0, anything else to
    F16."""
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


def gguf_nbytes(shape: tuple[int, ...], q: Q) -> int:
    block, size = GGML_QUANT_SIZES[q]
    return int(np.prod(shape)) // block * size


def byte_shape(shape: tuple[int, ...], q: Q) -> tuple[int, ...]:
    """The uint8 shape a writer declares for raw blocks of type `q`."""
    block, size = GGML_QUANT_SIZES[q]
    return (*shape[:-1], shape[-1] // block * size)


def declare_tensor(w: GGUFWriter, name: str, shape: tuple[int, ...], q: Q) -> None:
    """Announce a tensor of `shape` stored as raw blocks of type `q` (its data is written later, in order)."""
    w.add_tensor_info(name, byte_shape(shape, q), np.dtype(np.uint8), gguf_nbytes(shape, q), raw_dtype=q)


def write_encoded(w: GGUFWriter, t: np.ndarray, q: Q) -> None:
    """The next declared tensor's data: float32 `t` encoded as type `q`."""
    w.write_tensor_data(np.ascontiguousarray(encode_gguf(t, q)).view(np.uint8).reshape(-1))


def write_file(path: Path, arch: str, add_metadata: Callable[[GGUFWriter], None],
               plan: list[tuple[str, tuple[int, ...], Q]], data: Callable[[int], np.ndarray],
               progress: Callable[[int, int], None] | None = None) -> Path:
    """A whole GGUF: `add_metadata` writes the keys, then tensor i of `plan` (name, shape, type) gets `data(i)`,
    float32 encoded as its type or uint8 raw blocks taken as they are. On any failure (a config no key carries,
    a bad tensor, an interrupt) the partial file is removed."""
    w = GGUFWriter(str(path), arch)
    try:
        add_metadata(w)
        for name, shape, q in plan:
            declare_tensor(w, name, shape, q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (_, _, q) in enumerate(plan):
            t = data(i)
            if t.dtype == np.uint8:
                w.write_tensor_data(np.ascontiguousarray(t).reshape(-1))
            else:
                write_encoded(w, t, q)
            if progress:
                progress(i + 1, len(plan))
        w.close()
    except BaseException:
        try:
            w.close()
        finally:
            path.unlink(missing_ok=True)
        raise
    return path
