"""Commands that measure a model: perplexity, quality, bench."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import GemrunError
from .common import (
    DeviceOpt,
    DraftOpt,
    DraftTokens,
    DtypeOpt,
    KvOpt,
    MmprojOpt,
    ModelOpt,
    PackedOpt,
    PrefillOpt,
    QuantOpt,
    TpOpt,
    app,
    check_tp,
    err,
    load_model,
    torch_module,
)

if TYPE_CHECKING:
    from ..api import Model


def _read_ids(m: Model, file: Path) -> list[int]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GemrunError(f"cannot read {file} as UTF-8 text: {e}") from None
    ids = m.tokenizer.encode(text)
    if not ids:
        raise GemrunError(f"{file} holds no text")
    return ids


ContextOpt = Annotated[int, typer.Option(help="tokens per evaluation window (each starts with <bos>)")]
ChunkOpt = Annotated[int, typer.Option(help="tokens per forward pass (packed CPU weights: under 64 takes the "
                                       "integer kernels, 64 and more the dense path)")]


@app.command()
def perplexity(file: Annotated[Path, typer.Argument(help="UTF-8 text file")], model: ModelOpt = None,
               context: ContextOpt = 1024, chunk: ChunkOpt = 256, device: DeviceOpt = "auto",
               dtype: DtypeOpt = "auto", quantize: QuantOpt = None, packed: PackedOpt = None,
               prefill: PrefillOpt = None) -> None:
    """Perplexity of FILE: the text is cut into windows of CONTEXT tokens, each starting with <bos>."""
    from ..quality import evaluate

    m = load_model(model, device, dtype, quantize=quantize, packed=packed, prefill=prefill)
    t0 = time.perf_counter()
    res = evaluate(m, _read_ids(m, file), context=context, chunk=chunk)
    print(json.dumps(res.as_dict()))
    err.print(f"[dim]{res.tokens / (time.perf_counter() - t0):.1f} tokens/s[/dim]")


@app.command()
def quality(file: Annotated[Path, typer.Argument(help="UTF-8 text file")], model: ModelOpt = None,
            ref: Annotated[str | None, typer.Option(help="reference model (default: MODEL itself, float32, "
                                                    "dequantized)")] = None,
            context: ContextOpt = 1024, chunk: ChunkOpt = 256, device: DeviceOpt = "auto",
            dtype: DtypeOpt = "auto", quantize: QuantOpt = None, packed: PackedOpt = None,
            ref_dtype: Annotated[str, typer.Option(help="dtype of the reference")] = "float32",
            ref_quantize: Annotated[str | None, typer.Option(help="quantize the reference at load")] = None,
            prefill: PrefillOpt = None) -> None:
    """What MODEL's format costs against REF on FILE: both perplexities, mean and max KL(REF || MODEL) of the
    next-token distributions, top-1 agreement (teacher-forced)."""
    from ..quality import evaluate

    a = load_model(model, device, dtype, quantize=quantize, packed=packed, prefill=prefill)
    b = load_model(ref or model, device, ref_dtype, quantize=ref_quantize)
    t0 = time.perf_counter()
    res = evaluate(a, _read_ids(b, file), ref=b, context=context, chunk=chunk)
    print(json.dumps(res.as_dict()))
    err.print(f"[dim]{res.tokens / (time.perf_counter() - t0):.1f} tokens/s[/dim]")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_tokens(m: Model, n: int) -> list[int]:
    """n token ids of plain text (bos first), the prompts of `bench`."""
    text = " ".join(f"The {i}th sentence of the benchmark talks about the weather in city number {i}."
                    for i in range(n))
    return m.tokenizer.encode(text, bos=True)[:n]


def timed_run(m: Model, every: list[int], depth: int, gen_tokens: int, pool=None) -> tuple:
    """Prefill every[depth:] after every[:depth] and decode gen_tokens greedily (EOS ignored): (prefill tok/s,
    decode tok/s, time to first token, draft acceptance, (start, first token, end) on CLOCK_MONOTONIC, cached
    tokens). The depth's KV is made untimed first and handed over through a prefix pool, as a reused prefix is;
    its caches are sized for the whole run, as llama-bench sizes its context (depth + prompt + gen). A `pool`
    given by the caller is used and kept: the untimed fill starts from its longest prefix of every[:depth] (an
    earlier run's prompt), and this run's caches go back into it."""
    from ..generate import Prompt, Sequence, Stats, generate_ids
    from ..prefix import PrefixPool
    from ..sampling import SamplingParams

    if depth:
        pool = pool if pool is not None else PrefixPool(1 << 62)
        reserve = SamplingParams(temperature=0, max_tokens=len(every) - depth + gen_tokens)
        fill = Sequence(m.model, every[:depth], reserve, set(), m.max_context, m.tokenizer.vocab_size, pool=pool)
        while not fill.prefilled:
            fill.prefill_step()
        fill.release()
    stats = Stats()
    params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    t = time.perf_counter()  # CLOCK_MONOTONIC: the windows let a harness check what else ran meanwhile
    first = None
    for _token in generate_ids(m.model, Prompt(every), params, set(), m.max_context, m.tokenizer.vocab_size, stats,
                               draft=m.draft, pool=pool):
        first = first or time.perf_counter() - t
    return ((len(every) - depth) / stats.prefill_seconds, stats.decode_tps, first, stats.acceptance_rate,
            (t, t + first, time.perf_counter()), stats.cached_tokens)


@app.command()
def bench(model: ModelOpt = None, prompt_tokens: Annotated[int, typer.Option(help="prefill length")] = 512,
          gen_tokens: Annotated[int, typer.Option(help="decode length")] = 128,
          repeat: Annotated[int, typer.Option(help="runs; medians are reported")] = 3,
          threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")] = None,
          depth: Annotated[int, typer.Option(help="tokens already in the cache before each run (as llama-bench "
                                             "-d): prefill and decode at that depth")] = 0,
          device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
          packed: PackedOpt = None, quantize: QuantOpt = None, mmproj: MmprojOpt = None, draft: DraftOpt = None,
          draft_tokens: DraftTokens = 4, kv_cache: KvOpt = "auto", tp: TpOpt = None,
          prefill: PrefillOpt = None) -> None:
    """Prefill tokens/s (PROMPT_TOKENS prompt), decode tokens/s (GEN_TOKENS, greedy, EOS ignored), time to
    first token, and peak RSS, as JSON on stdout (medians over REPEAT runs); with --depth, after DEPTH tokens
    already in the KV cache (filled untimed before each run)."""
    import statistics

    from ..api import load
    from ..quant import native

    torch = torch_module()
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = load(model, device=device, dtype=dtype, packed=packed, quantize=quantize, mmproj=mmproj, draft=draft,
             draft_tokens=draft_tokens, kv_cache=kv_cache, tp=check_tp(tp, draft), prefill=prefill)
    load_s = time.perf_counter() - t0
    if depth and m.draft is not None:
        raise GemrunError("--depth and --draft together are not supported (drafted runs take no cached prefix)")
    if depth + prompt_tokens + gen_tokens >= m.max_context:
        raise GemrunError(f"depth {depth} + prompt {prompt_tokens} + {gen_tokens} tokens exceed the context of "
                          f"{m.max_context}")
    every = bench_tokens(m, depth + prompt_tokens)
    ids = every[depth:]
    runs = [timed_run(m, every, depth, gen_tokens) for _ in range(max(1, repeat) + 1)]  # the first warms up
    runs = runs[1:]
    w = m.model
    out = {"model": str(m.loaded.path), "format": m.loaded.format, "dtype": str(w.dtype).replace("torch.", ""),
           "packed": type(w.layers[0].mlp.up_proj).__name__ != "Linear", "threads": torch.get_num_threads(),
           "tp": getattr(w, "world", 1), "load_s": round(load_s, 2), "kv_cache": m.model.kv_type,
           "prefill": native.PREFILL, "depth": depth,
           "prompt_tokens": len(ids), "gen_tokens": gen_tokens,
           "prefill_tok_s": round(statistics.median(r[0] for r in runs), 2),
           "decode_tok_s": round(statistics.median(r[1] for r in runs), 2),
           "ttft_s": round(statistics.median(r[2] for r in runs), 3),
           "weights_bytes": sum(t.nbytes for t in [*w.parameters(), *w.buffers()]),
           "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
           "runs": [{"prefill_tok_s": round(r[0], 2), "decode_tok_s": round(r[1], 2), "cached_tokens": r[5],
                     "prefill_window": r[4][:2], "decode_window": r[4][1:]} for r in runs]}
    if m.draft is not None:
        out["draft_acceptance"] = round(statistics.median(r[3] for r in runs), 3)
    if w.device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(w.device) / 2**30, 3)
    print(json.dumps(out))
