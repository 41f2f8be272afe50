"""The `gemrun` command line: results on stdout, progress and statistics on stderr.

torch and the model code are imported inside the commands that need them, so `gemrun --help`, `gemrun info` and
argument errors answer at once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .config import PRESETS
from .errors import GemrunError

if TYPE_CHECKING:
    from .api import Model
    from .sampling import SamplingParams

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


def _torch():
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


KvOpt = Annotated[str, typer.Option("--kv-cache", help="KV cache precision: auto (the activations' dtype) | f32 "
                                    "| bf16 | q8_0 (about half of bf16's memory, as llama.cpp's -ctk/-ctv q8_0)")]


def _load(model: str | None, device: str, dtype: str, max_context: int | None = None, quiet: bool = False,
          mmproj: str | None = None, pan_and_scan: bool = False, quantize: str | None = None,
          packed: bool | None = None, kv_cache: str = "auto") -> Model:
    _torch()
    from .api import load

    with Progress(TextColumn("loading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=quiet) as bar:
        task = bar.add_task("load", total=None)
        m = load(model, device=device, dtype=dtype, max_context=max_context, mmproj=mmproj,
                 pan_and_scan=pan_and_scan, quantize=quantize, packed=packed, kv_cache=kv_cache,
                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    return m


DraftOpt = Annotated[str | None, typer.Option("--draft", help="Gemma 4 MTP drafter (assistant directory or GGUF): "
                                              "speculative decoding")]
MmprojOpt = Annotated[str | None, typer.Option("--mmproj", help="media encoder GGUF (llama.cpp mmproj) for a GGUF "
                                               "model")]
DraftTokens = Annotated[int, typer.Option("--draft-tokens", help="tokens drafted per round")]


def _drafter(m: Model, draft: str | None, tokens: int) -> None:
    if draft:
        m.use_drafter(draft, tokens)


def _params(max_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
            presence_penalty: float, frequency_penalty: float, seed: int | None, stop: list[str] | None):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repeat_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, seed=seed, stop=list(stop or []))


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _report(m: Model) -> None:
    s = m.last_stats
    drafted = f" | draft acceptance {s.acceptance_rate:.0%} of {s.drafted_tokens}" if s.drafted_tokens else ""
    err.print(f"[dim]prompt {_tokens(s.prompt_tokens)}, {s.prefill_tps:.1f} tok/s prefill | generated "
              f"{_tokens(s.generated_tokens)}, {s.decode_tps:.1f} tok/s decode | finish: {s.finish_reason}"
              f"{drafted}[/dim]")


def _clamp(params: SamplingParams, m: Model) -> None:
    """--max-tokens past the context: clamped, with a warning (generation could not go further anyway)."""
    if params.max_tokens >= m.max_context:
        err.print(f"[yellow]warning:[/yellow] --max-tokens {params.max_tokens} is more than the context of "
                  f"{m.max_context} tokens; clamped to {m.max_context - 1}")
        params.max_tokens = m.max_context - 1


def _emit(pieces) -> None:
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


@app.command()
def generate(prompt: Annotated[str, typer.Argument(help="text to continue")], model: ModelOpt = None,
             max_tokens: MaxTok = 256, temperature: Temp = 1.0, top_k: TopK = 64, top_p: TopP = 0.95,
             min_p: MinP = 0.0, repeat_penalty: Rep = 1.0, presence_penalty: Pres = 0.0,
             frequency_penalty: Freq = 0.0, seed: Seed = None, stop: Stop = None, device: DeviceOpt = "auto",
             dtype: DtypeOpt = "auto", max_context: MaxCtx = None,
             quantize: QuantOpt = None, packed: PackedOpt = None, draft: DraftOpt = None,
             draft_tokens: DraftTokens = 4, mmproj: MmprojOpt = None, kv_cache: KvOpt = "auto") -> None:
    """Continue PROMPT as raw text and stream the continuation only."""
    params = _params(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                     frequency_penalty, seed, stop)
    m = _load(model, device, dtype, max_context, quantize=quantize, packed=packed, mmproj=mmproj, kv_cache=kv_cache)
    _drafter(m, draft, draft_tokens)
    _clamp(params, m)
    _emit(m.generate(prompt, params, stream=True))
    _report(m)
    if m.last_stats.finish_reason == "length":
        err.print(f"[dim]stopped at the limit of {_tokens(params.max_tokens)} (--max-tokens): a raw continuation "
                  "rarely ends by itself; `gemrun chat` talks to instruction-tuned models[/dim]")


@app.command()
def chat(model: ModelOpt = None, message: Annotated[str | None, typer.Option("--message", "-p", help="one-shot: "
         "answer this message and exit")] = None,
         system: Annotated[str | None, typer.Option(help="system prompt")] = None,
         max_tokens: MaxTok = 1024, temperature: Temp = 1.0, top_k: TopK = 64, top_p: TopP = 0.95,
         min_p: MinP = 0.0, repeat_penalty: Rep = 1.0, presence_penalty: Pres = 0.0, frequency_penalty: Freq = 0.0,
         seed: Seed = None, stop: Stop = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
         max_context: MaxCtx = None,
         image: Annotated[list[str] | None, typer.Option("--image", "-i", help="image file for the first "
                                                         "message (repeatable)")] = None,
         mmproj: MmprojOpt = None,
         pan_and_scan: Annotated[bool, typer.Option("--pan-and-scan", help="add crops of large or elongated "
                                                    "images")] = False, quantize: QuantOpt = None,
         packed: PackedOpt = None,
         audio: Annotated[list[str] | None, typer.Option("--audio", "-a", help="audio file (WAV/FLAC/OGG/MP3) for "
                                                         "the first message, Gemma 4 (repeatable)")] = None,
         video: Annotated[list[str] | None, typer.Option("--video", help="video file for the first message, "
                                                         "Gemma 4 (repeatable)")] = None,
         think: Annotated[bool | None, typer.Option("--think/--no-think", help="Gemma 4 thinking mode; the "
                                                    "thoughts are shown dimmed, apart from the answer")] = None,
         image_tokens: Annotated[int | None, typer.Option("--image-tokens", help="Gemma 4 soft tokens per image: "
                                                          "70, 140, 280 (default), 560, 1120 (OCR)")] = None,
         draft: DraftOpt = None, draft_tokens: DraftTokens = 4, kv_cache: KvOpt = "auto") -> None:
    """Chat through the model's template. Interactive (like `ollama run`): /help lists the commands (/system,
    /image, /reset, /save FILE, /load FILE, /bye); end a line with \\ to continue it; Ctrl-C stops a reply."""
    from .repl import Conversation, Repl

    params = _params(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                     frequency_penalty, seed, stop)
    m = _load(model, device, dtype, max_context, mmproj=mmproj, pan_and_scan=pan_and_scan, quantize=quantize,
              packed=packed, kv_cache=kv_cache)
    _drafter(m, draft, draft_tokens)
    _clamp(params, m)
    kinds = m.prompts().media_kinds
    for flag, given, able in (("--audio", audio, "audio" in kinds), ("--video", video, "video" in kinds),
                              ("--think/--no-think", think is not None, m.format.thinking),
                              ("--image-tokens", image_tokens, bool(m.inputs and m.inputs.budgets))):
        if given and not able:
            raise GemrunError(f"{flag}: this model cannot take it")

    def reply(messages: list[dict]):
        return m.events(m.chat_prompt(messages, think=think, image_tokens=image_tokens), params)

    repl = Repl(Conversation(system, image or [], audio or [], video or []), reply, lambda: _report(m), err,
                "image" in kinds)
    if message is None:
        return repl.run()
    repl.answer(message)


@app.command()
def serve(model: ModelOpt = None,
          host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 exposes the server)")] = "127.0.0.1",
          port: Annotated[int, typer.Option()] = 8000,
          api_key: Annotated[str | None, typer.Option("--api-key", envvar="GEMRUN_API_KEY",
                                                      help="require Authorization: Bearer KEY on every route "
                                                      "but /health; prefer GEMRUN_API_KEY or --api-key-file "
                                                      "(a key on the command line shows in ps)")] = None,
          api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="read the API key from this "
                                                            "file (first line)")] = None,
          allowed_hosts: Annotated[list[str] | None, typer.Option("--allowed-hosts", help="Host names served "
                                                                  "besides localhost (repeatable; * for any): "
                                                                  "DNS-rebinding defence")] = None,
          cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", help="allow this browser origin "
                                                                "(repeatable; CORS is off by default)")] = None,
          served_model_name: Annotated[str | None, typer.Option(help="model name clients use (default: the "
                                                                "file name)")] = None,
          max_context: MaxCtx = None,
          max_batch: Annotated[int, typer.Option(help="sequences decoded together")] = 8,
          max_queue: Annotated[int, typer.Option(help="requests waiting beyond the batch; past it, 429")] = 64,
          max_body_mb: Annotated[float, typer.Option(help="request body limit in MiB")] = 32,
          max_tokens: Annotated[int, typer.Option("--max-tokens-default", "--max-tokens",
                                                  help="tokens a reply may take when its request sets no limit "
                                                  "(at most the rest of the context)")] = 2048,
          request_timeout: Annotated[float, typer.Option(help="seconds a request may run")] = 600,
          cache_ram: Annotated[float, typer.Option("--cache-ram", help="GiB of finished requests' KV caches kept "
                                                   "for prompts that share their prefix (0: off)")] = 4.0,
          shutdown_deadline: Annotated[float, typer.Option(help="seconds in-flight requests get on SIGTERM")] = 10,
          device: DeviceOpt = "auto",
          dtype: Annotated[str, typer.Option(help="auto (bfloat16: packed weights, batch-invariant kernels) | "
                                             "float32 | bfloat16")] = "auto",
          mmproj: MmprojOpt = None,
          quantize: QuantOpt = None,
          log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
          draft: DraftOpt = None, draft_tokens: DraftTokens = 4, kv_cache: KvOpt = "auto") -> None:
    """Serve the model over OpenAI- and Ollama-compatible HTTP APIs, batching concurrent requests."""
    import logging

    from .server.app import Server, Settings, create_app, server_config

    if not 0 < port < 65536:
        raise GemrunError(f"--port must be in 1..65535, got {port}")
    if not 1 <= max_batch <= 63 or max_queue < 0 or max_body_mb <= 0 or request_timeout <= 0:
        raise GemrunError("--max-batch must be in 1..63, --max-queue >= 0, --max-body-mb and --request-timeout > 0")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise GemrunError(f"cannot read an API key from {api_key_file}: {e}") from None
    elif api_key and any(a == "--api-key" or a.startswith("--api-key=") for a in sys.argv):
        err.print("[yellow]warning:[/yellow] an API key on the command line is visible to other users (ps); "
                  "use GEMRUN_API_KEY or --api-key-file")
    from .server.app import is_loopback

    if not is_loopback(host) and not api_key:
        err.print(f"[yellow]warning:[/yellow] serving on {host} without an API key: anyone who can reach this "
                  "address can use the model (set GEMRUN_API_KEY or --api-key-file)")
    settings = Settings(host=host, port=port, api_key=api_key or None, cors_origins=list(cors_origin or []),
                        allowed_hosts=list(allowed_hosts or []),
                        max_body=int(max_body_mb * (1 << 20)), max_batch=max_batch, max_queue=max_queue,
                        request_timeout=request_timeout, max_tokens_default=max_tokens,
                        shutdown_deadline=shutdown_deadline, served_name=served_model_name, draft=draft,
                        cache_ram=cache_ram,
                        draft_tokens=draft_tokens)
    if max_tokens < 1:
        raise GemrunError(f"--max-tokens-default must be >= 1, got {max_tokens}")
    listener = _listen(host, port)  # a port in use fails here, before anything is loaded or announced
    torch = _torch()
    serve_dtype = dtype if dtype != "auto" else "bfloat16"
    if dtype == "auto" and device != "cpu" and torch.cuda.is_available():
        serve_dtype = "auto"

    def loader():
        from .api import load

        return load(model, device=device, dtype=serve_dtype, max_context=max_context, mmproj=mmproj,
                    quantize=quantize, kv_cache=kv_cache)

    app_ = create_app(loader, settings)
    err.print(f"[dim]gemrun serving on http://{host}:{port} (OpenAI: /v1, Ollama: /api)[/dim]")
    Server(server_config(app_, settings, log_level)).run(sockets=[listener])


def _listen(host: str, port: int):
    """The server's listening socket, bound now so that an address in use is a clean error (exit 2)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GemrunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@app.command()
def tokenize(text: str, model: ModelOpt = None,
             bos: Annotated[bool, typer.Option("--bos", help="prepend <bos>")] = False) -> None:
    """Print the token ids of TEXT as a JSON list (control-token spellings stay plain text)."""
    m = _load(model, "cpu", "auto", quiet=True)
    print(json.dumps(m.tokenizer.encode(text, bos=bos)))


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
               dtype: DtypeOpt = "auto", quantize: QuantOpt = None, packed: PackedOpt = None) -> None:
    """Perplexity of FILE: the text is cut into windows of CONTEXT tokens, each starting with <bos>."""
    from .quality import evaluate

    m = _load(model, device, dtype, quantize=quantize, packed=packed)
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
            ref_quantize: Annotated[str | None, typer.Option(help="quantize the reference at load")] = None) -> None:
    """What MODEL's format costs against REF on FILE: both perplexities, mean and max KL(REF || MODEL) of the
    next-token distributions, top-1 agreement (teacher-forced)."""
    from .quality import evaluate

    a = _load(model, device, dtype, quantize=quantize, packed=packed)
    b = _load(ref or model, device, ref_dtype, quantize=ref_quantize)
    t0 = time.perf_counter()
    res = evaluate(a, _read_ids(b, file), ref=b, context=context, chunk=chunk)
    print(json.dumps(res.as_dict()))
    err.print(f"[dim]{res.tokens / (time.perf_counter() - t0):.1f} tokens/s[/dim]")


def _hwm_bytes() -> int:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@app.command()
def bench(model: ModelOpt = None, prompt_tokens: Annotated[int, typer.Option(help="prefill length")] = 512,
          gen_tokens: Annotated[int, typer.Option(help="decode length")] = 128,
          repeat: Annotated[int, typer.Option(help="runs; medians are reported")] = 3,
          threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")] = None,
          depth: Annotated[int, typer.Option(help="tokens already in the cache before each run (as llama-bench "
                                             "-d): prefill and decode at that depth")] = 0,
          device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
          packed: PackedOpt = None, quantize: QuantOpt = None, mmproj: MmprojOpt = None, draft: DraftOpt = None,
          draft_tokens: DraftTokens = 4, kv_cache: KvOpt = "auto") -> None:
    """Prefill tokens/s (PROMPT_TOKENS prompt), decode tokens/s (GEN_TOKENS, greedy, EOS ignored), time to
    first token, and peak RSS, as JSON on stdout (medians over REPEAT runs); with --depth, after DEPTH tokens
    already in the KV cache (filled untimed before each run)."""
    import statistics

    from .api import load
    from .cache import PrefixPool
    from .generate import Prompt, Stats, generate_ids
    from .sampling import SamplingParams

    torch = _torch()
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = load(model, device=device, dtype=dtype, packed=packed, quantize=quantize, mmproj=mmproj, draft=draft,
             draft_tokens=draft_tokens, kv_cache=kv_cache)
    load_s = time.perf_counter() - t0
    if depth and m.draft is not None:
        raise GemrunError("--depth and --draft together are not supported (drafted runs take no cached prefix)")
    if depth + prompt_tokens + gen_tokens >= m.max_context:
        raise GemrunError(f"depth {depth} + prompt {prompt_tokens} + {gen_tokens} tokens exceed the context of "
                          f"{m.max_context}")
    text = " ".join(f"The {i}th sentence of the benchmark talks about the weather in city number {i}."
                    for i in range(depth + prompt_tokens))
    every = m.tokenizer.encode(text, bos=True)[:depth + prompt_tokens]
    ids = every[depth:]
    params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    runs = []
    for _ in range(max(1, repeat) + 1):  # the first run warms up and is dropped
        pool = None
        if depth:  # the depth's KV, made untimed and handed over through a prefix pool, as a reused prefix is
            pool = PrefixPool(1 << 62)
            for _token in generate_ids(m.model, every[:depth], SamplingParams(temperature=0, max_tokens=1), set(),
                                       m.max_context, m.tokenizer.vocab_size, Stats(), pool=pool):
                pass
        stats = Stats()
        t = time.perf_counter()
        first = None
        for _token in generate_ids(m.model, Prompt(every), params, set(), m.max_context, m.tokenizer.vocab_size,
                                   stats, draft=m.draft, pool=pool):
            first = first or time.perf_counter() - t
        runs.append((len(ids) / stats.prefill_seconds, stats.decode_tps, first, stats.acceptance_rate))
    runs = runs[1:]
    w = m.model
    out = {"model": str(m.loaded.path), "format": m.loaded.format, "dtype": str(w.dtype).replace("torch.", ""),
           "packed": type(w.layers[0].mlp.up_proj).__name__ != "Linear", "threads": torch.get_num_threads(),
           "load_s": round(load_s, 2), "kv_cache": m.model.kv_type, "depth": depth, "prompt_tokens": len(ids),
           "gen_tokens": gen_tokens,
           "prefill_tok_s": round(statistics.median(r[0] for r in runs), 2),
           "decode_tok_s": round(statistics.median(r[1] for r in runs), 2),
           "ttft_s": round(statistics.median(r[2] for r in runs), 3),
           "weights_bytes": sum(t.nbytes for t in [*w.parameters(), *w.buffers()]),
           "peak_rss_gib": round(_hwm_bytes() / 2**30, 3)}
    if m.draft is not None:
        out["draft_acceptance"] = round(statistics.median(r[3] for r in runs), 3)
    print(json.dumps(out))


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
    from .convert import DEFAULT_KEEP
    from .convert import convert as run

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
    from .weights.random import write_random_gguf, write_random_hf

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
    from .cache import VALUE_BYTES
    from .weights.embedded import default_model_path
    from .weights.inspect import describe

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


def main() -> None:
    try:
        app()
    except GemrunError as e:
        err.print(f"[red]error:[/red] {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
