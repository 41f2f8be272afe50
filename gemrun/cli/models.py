"""Commands about model files: tokenize, convert, make-random, info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import PRESETS
from ..errors import GemrunError
from .common import ModelOpt, app, err, load_model


@app.command()
def tokenize(text: str, model: ModelOpt = None,
             bos: Annotated[bool, typer.Option("--bos", help="prepend <bos>")] = False) -> None:
    """Print the token ids of TEXT as a JSON list (control-token spellings stay plain text)."""
    m = load_model(model, "cpu", "auto", quiet=True)
    print(json.dumps(m.tokenizer.encode(text, bos=bos)))


@app.command()
def convert(src: Annotated[Path, typer.Argument(help="GGUF file or HF directory")],
            out: Annotated[Path, typer.Argument(help="a .gguf file, or an HF directory")],
            quant: Annotated[str, typer.Option(help="GGUF: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | "
                                               "q4_k; HF: bf16 | f16 | f32 | int4-channel | int4-block | "
                                               "fp8")] = "bf16",
            group_size: Annotated[int, typer.Option(help="int4-block group size")] = 32,
            fp8_scales: Annotated[str, typer.Option(help="fp8 scales: channel | tensor")] = "channel",
            keep: Annotated[list[str] | None, typer.Option(help="matrices (glob on gemrun names, e.g. 'layers.0.*') "
                                                           "kept in bf16 by quantized HF schemes; default: the "
                                                           "embedding (= the tied output head); norms always")] = None,
            embed_quant: Annotated[str | None, typer.Option(help="GGUF type of the embedding (default: q8_0 under "
                                                            "4/5-bit types)")] = None,
            mmproj: Annotated[Path | None, typer.Option(help="vision tower as a llama.cpp mmproj GGUF: written "
                                                        "from an HF SRC with a .gguf OUT, read with a GGUF SRC "
                                                        "and an HF OUT")] = None,
            mmproj_quant: Annotated[str, typer.Option(help="mmproj matrices: f16 | f32 | bf16 | q8_0 (patch and "
                                                      "position embeddings stay f32)")] = "f16",
            draft: Annotated[tuple[Path, Path] | None, typer.Option(help="Gemma 4: convert the MTP assistant SRC "
                                                                    "(HF directory or GGUF) to OUT beside the "
                                                                    "model")] = None) -> None:
    """Convert between HF safetensors and GGUF (llama.cpp layout, vision tower as an mmproj file), or write
    quantized HF safetensors; streaming, tensor by tensor."""
    from ..convert import DEFAULT_KEEP
    from ..convert import convert as run

    if fp8_scales not in ("channel", "tensor"):
        raise GemrunError(f"--fp8-scales must be channel or tensor, got {fp8_scales!r}")
    if not src.exists():
        raise GemrunError(f"{src} does not exist")
    if out.exists() and out.resolve() == src.resolve():
        raise GemrunError("OUT must differ from SRC")
    with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("convert", total=None)
        path = run(src, out, quant, group=group_size, fp8_per_channel=fp8_scales == "channel",
                   keep=tuple(keep) if keep else DEFAULT_KEEP, embed_quant=embed_quant, mmproj=mmproj,
                   mmproj_quant=mmproj_quant, draft=draft,
                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(json.dumps({"out": str(path), "quant": quant} | ({"mmproj": str(mmproj)} if mmproj else {})
                     | ({"draft": str(draft[1])} if draft else {})))


@app.command("make-random")
def make_random(out: Annotated[Path, typer.Argument(help="output GGUF file, or directory for --format hf")],
                preset: Annotated[str, typer.Option(help="config preset: " + ", ".join(PRESETS))] = "gemma-3-12b",
                format: Annotated[str, typer.Option("--format", help="gguf | hf (safetensors directory)")] = "gguf",
                quant: Annotated[str, typer.Option(help="gguf: q4_0 | q8_0 | f16 | bf16 | f32; hf: bf16 | f16 | "
                                                   "f32")] = "q4_0",
                embed_quant: Annotated[str, typer.Option(help="gguf embedding type")] = "q8_0",
                vision: Annotated[bool, typer.Option("--vision", help="hf: add the SigLIP vision tower")] = False,
                mmproj: Annotated[Path | None, typer.Option(help="gguf, Gemma 4: the mmproj file (default: "
                                                            "mmproj-OUT beside OUT)")] = None,
                draft: Annotated[Path | None, typer.Option(help="gguf, Gemma 4: the drafter file (default: "
                                                           "OUT-assistant.gguf beside OUT)")] = None,
                seed: int = 0) -> None:
    """Write a full-shape checkpoint of random weights (for speed and memory benchmarks) with the real
    tokenizer of the embedded model. A Gemma 4 preset in GGUF writes the set: text model, mmproj, drafter."""
    from ..weights.random import write_random_gguf, write_random_hf

    with Progress(TextColumn("writing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("write", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if format == "gguf":
            if vision:
                raise GemrunError("--vision is for --format hf (a GGUF's vision tower is a separate mmproj file)")
            files = write_random_gguf(preset, out, quant, embed_quant, seed, progress, mmproj, draft)
            print(json.dumps({"written": str(out), "preset": preset, "format": format}
                             | {k: str(v) for k, v in files.items()}))
            return
        elif format == "hf":
            write_random_hf(preset, out, vision, "bf16" if quant == "q4_0" else quant, seed, progress=progress)
        else:
            raise GemrunError(f"--format {format!r} is not gguf or hf")
    print(json.dumps({"written": str(out), "preset": preset, "format": format}))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@app.command()
def info(model: Annotated[str | None, typer.Argument(help="GGUF file, HF directory, or a preset name: "
                                                     + ", ".join(PRESETS) + " (default: the embedded model)")]
         = None,
         context: Annotated[int | None, typer.Option(help="context for the cache size (default: the model's)")]
         = None) -> None:
    """Model facts, parameter count, KV bytes per token and the KV cache size at the full context (bf16 cache;
    `kv_cache_by_type` for each --kv-cache), read from the file's metadata (no weights are loaded)."""
    from ..cache import VALUE_BYTES
    from ..weights.embedded import default_model_path
    from ..weights.inspect import describe

    d = describe(model or default_model_path())
    cfg = d.config
    ctx = context or cfg.max_position_embeddings
    per = cfg.kv_bytes_per_token(2)
    layers = cfg.layers
    out = {
        "source": d.source, "layers": cfg.num_layers,
        "sliding_layers": sum(s.sliding for s in layers), "global_layers": sum(not s.sliding for s in layers),
        "hidden_size": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "sliding_window": cfg.sliding_window, "vocab_size": cfg.vocab_size,
        "max_context": cfg.max_position_embeddings, "parameters": d.parameters,
        "kv_bytes_per_token_bf16": {"global_layers": per["global"], "sliding_layers_until_window": per["sliding"]},
        "kv_cache_context": ctx, "kv_cache_bytes_bf16": cfg.kv_cache_bytes(ctx, 2),
        "kv_cache_bf16": _gib(cfg.kv_cache_bytes(ctx, 2)),
        "kv_cache_without_window_bf16": _gib(ctx * (per["global"] + per["sliding"])),
        "kv_cache_by_type": {kind: {"bytes_per_token": sum(cfg.kv_bytes_per_token(size).values()),
                                    "at_context": _gib(cfg.kv_cache_bytes(ctx, size))}
                             for kind, size in VALUE_BYTES.items()},
    }
    glob = next((s for s in layers if not s.sliding), None)
    if glob is not None and (glob.head_dim, glob.num_kv_heads) != (cfg.head_dim, cfg.num_kv_heads):
        # global layers of their own shape (Gemma 4); layers that share KV store nothing
        out |= {"global_head_dim": glob.head_dim, "global_kv_heads": glob.num_kv_heads,
                "global_keys_are_values": glob.k_eq_v, "kv_sharing_layers": sum(s.kv_source is not None
                                                                               for s in layers)}
    print(json.dumps(out, indent=2))
