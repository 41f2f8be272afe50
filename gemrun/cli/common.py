"""What every command shares: the Typer app, the console for progress and statistics, the common options,
loading a model with a progress bar, and the sampling options of generate and chat."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import GemrunError

if TYPE_CHECKING:
    from ..api import Model
    from ..sampling import SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run Google's Gemma models locally.")
err = Console(stderr=True, soft_wrap=True)
THREADS: list[int] = []  # --threads, applied when torch is first needed


def _version(value: bool) -> None:
    if value:
        print(f"gemrun {__version__}")
        raise typer.Exit()


@app.callback()
def _options(threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for every command "
                                                         "(default: all cores)")] = None,
             version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="print the version and exit")] = False) -> None:
    if threads is not None and threads < 1:
        raise GemrunError(f"--threads must be >= 1, got {threads}")
    THREADS[:] = [threads or os.cpu_count() or 1]


def torch_module():
    import torch

    torch.set_num_threads(THREADS[0] if THREADS else os.cpu_count() or 1)
    return torch


ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="GGUF file or HF directory (default: the "
                                              "embedded Gemma 3 270M)")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | mps")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 (float16 is refused). On the CPU: auto = "
                                        "float32 activations over packed low-bit weights, float32 = dense dequantized "
                                        "weights (exact), bfloat16 = packed weights, bf16 activations")]
PackedOpt = Annotated[bool | None, typer.Option("--packed/--dense", help="keep a GGUF's quantized matrices low-bit "
                                                "(default: see --dtype)")]
QuantOpt = Annotated[str | None, typer.Option("--quantize", help="q4 | q8 | none: quantize a float HF checkpoint "
                                              "at load")]
TpOpt = Annotated[int | None, typer.Option("--tp", help="tensor parallelism over N processes (one per GPU, or "
                                           "sharing the CPU threads): spawned here, or started by torchrun")]


KvOpt = Annotated[str, typer.Option("--kv-cache", help="KV cache precision: auto (the activations' dtype) | f32 "
                                    "| bf16 | q8_0 (about half of bf16's memory, as llama.cpp's -ctk/-ctv q8_0)")]


PrefillOpt = Annotated[str | None, typer.Option("--prefill", help="packed weights' kernel for long prompts: auto "
                                                "(int8 activations for Q4_0/Q8_0/Q5_0 as llama.cpp, bf16 otherwise) "
                                                "| exact (the decode kernel, ~14-bit activations) | bf16 | int8")]


def load_model(model: str | None, device: str, dtype: str, max_context: int | None = None, quiet: bool = False,
               mmproj: str | None = None, pan_and_scan: bool = False, quantize: str | None = None,
               packed: bool | None = None, kv_cache: str = "auto", tp: int | None = None,
               prefill: str | None = None) -> Model:
    torch_module()
    from ..api import load

    with Progress(TextColumn("loading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=quiet) as bar:
        task = bar.add_task("load", total=None)
        m = load(model, device=device, dtype=dtype, max_context=max_context, mmproj=mmproj,
                 pan_and_scan=pan_and_scan, quantize=quantize, packed=packed, kv_cache=kv_cache, tp=tp, prefill=prefill,
                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    return m


def check_tp(tp: int | None, draft: str | None) -> int | None:
    if tp is not None and tp < 1:
        raise GemrunError(f"--tp must be >= 1, got {tp}")
    if draft and (tp or 1) > 1:
        raise GemrunError("--draft (speculative decoding) does not run with --tp yet")
    return tp


DraftOpt = Annotated[str | None, typer.Option("--draft", help="Gemma 4 MTP drafter (assistant directory or GGUF): "
                                              "speculative decoding")]
MmprojOpt = Annotated[str | None, typer.Option("--mmproj", help="media encoder GGUF (llama.cpp mmproj) for a GGUF "
                                               "model")]
DraftTokens = Annotated[int, typer.Option("--draft-tokens", help="tokens drafted per round")]


def use_drafter(m: Model, draft: str | None, tokens: int) -> None:
    if draft:
        m.use_drafter(draft, tokens)


def sampling(max_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
             presence_penalty: float, frequency_penalty: float, seed: int | None, stop: list[str] | None):
    from ..sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repeat_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, seed=seed, stop=list(stop or []))


def tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def report(m: Model) -> None:
    s = m.last_stats
    drafted = f" | draft acceptance {s.acceptance_rate:.0%} of {s.drafted_tokens}" if s.drafted_tokens else ""
    err.print(f"[dim]prompt {tokens(s.prompt_tokens)}, {s.prefill_tps:.1f} tok/s prefill | generated "
              f"{tokens(s.generated_tokens)}, {s.decode_tps:.1f} tok/s decode | finish: {s.finish_reason}"
              f"{drafted}[/dim]")


def clamp(params: SamplingParams, m: Model) -> None:
    """--max-tokens past the context: clamped, with a warning (generation could not go further anyway)."""
    if params.max_tokens >= m.max_context:
        err.print(f"[yellow]warning:[/yellow] --max-tokens {params.max_tokens} is more than the context of "
                  f"{m.max_context} tokens; clamped to {m.max_context - 1}")
        params.max_tokens = m.max_context - 1


def emit(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# Sampling options shared by generate and chat (defaults: Gemma 3's generation_config).
MaxTok = Annotated[int, typer.Option("--max-tokens", "-n", help="tokens to generate at most")]
Temp = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")]
TopK = Annotated[int, typer.Option("--top-k", help="0 = off")]
TopP = Annotated[float, typer.Option("--top-p", help="nucleus sampling: keep the most likely tokens whose "
                                     "probabilities add up to this (1.0 = off)")]
MinP = Annotated[float, typer.Option("--min-p", help="drop tokens less likely than this fraction of the most "
                                     "likely one (0 = off)")]
MaxCtx = Annotated[int | None, typer.Option("--max-context", help="context length in tokens (default: the "
                                            "model's; smaller saves KV-cache memory)")]
Rep = Annotated[float, typer.Option("--repeat-penalty", help="1.0 = off")]
Pres = Annotated[float, typer.Option("--presence-penalty")]
Freq = Annotated[float, typer.Option("--frequency-penalty")]
Seed = Annotated[int | None, typer.Option("--seed", "-s")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="stop string (repeatable)")]

