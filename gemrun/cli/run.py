"""Commands that run a model: generate, chat, serve."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import GemrunError
from .common import (
    DeviceOpt,
    DraftOpt,
    DraftTokens,
    DtypeOpt,
    Freq,
    KvOpt,
    MaxCtx,
    MaxTok,
    MinP,
    MmprojOpt,
    ModelOpt,
    PackedOpt,
    PrefillOpt,
    Pres,
    QuantOpt,
    Rep,
    Seed,
    Stop,
    Temp,
    TopK,
    TopP,
    TpOpt,
    app,
    check_tp,
    clamp,
    emit,
    err,
    load_model,
    report,
    sampling,
    tokens,
    torch_module,
    use_drafter,
)


@app.command()
def generate(prompt: Annotated[str, typer.Argument(help="text to continue")], model: ModelOpt = None,
             max_tokens: MaxTok = 256, temperature: Temp = 1.0, top_k: TopK = 64, top_p: TopP = 0.95,
             min_p: MinP = 0.0, repeat_penalty: Rep = 1.0, presence_penalty: Pres = 0.0,
             frequency_penalty: Freq = 0.0, seed: Seed = None, stop: Stop = None, device: DeviceOpt = "auto",
             dtype: DtypeOpt = "auto", max_context: MaxCtx = None,
             quantize: QuantOpt = None, packed: PackedOpt = None, draft: DraftOpt = None,
             draft_tokens: DraftTokens = 4, mmproj: MmprojOpt = None, kv_cache: KvOpt = "auto",
             tp: TpOpt = None, prefill: PrefillOpt = None) -> None:
    """Continue PROMPT as raw text and stream the continuation only."""
    params = sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                      frequency_penalty, seed, stop)
    m = load_model(model, device, dtype, max_context, quantize=quantize, packed=packed, mmproj=mmproj,
                   kv_cache=kv_cache, tp=check_tp(tp, draft), prefill=prefill)
    use_drafter(m, draft, draft_tokens)
    clamp(params, m)
    emit(m.generate(prompt, params, stream=True))
    report(m)
    if m.last_stats.finish_reason == "length":
        err.print(f"[dim]stopped at the limit of {tokens(params.max_tokens)} (--max-tokens): a raw continuation "
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
         draft: DraftOpt = None, draft_tokens: DraftTokens = 4, kv_cache: KvOpt = "auto",
         tp: TpOpt = None, prefill: PrefillOpt = None) -> None:
    """Chat through the model's template. Interactive (like `ollama run`): /help lists the commands (/system,
    /image, /reset, /save FILE, /load FILE, /bye); end a line with \\ to continue it; Ctrl-C stops a reply."""
    from ..repl import Conversation, Repl

    params = sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                      frequency_penalty, seed, stop)
    m = load_model(model, device, dtype, max_context, mmproj=mmproj, pan_and_scan=pan_and_scan, quantize=quantize,
                   packed=packed, kv_cache=kv_cache, tp=check_tp(tp, draft), prefill=prefill)
    use_drafter(m, draft, draft_tokens)
    clamp(params, m)
    kinds = m.prompts().media_kinds
    for flag, given, able in (("--audio", audio, "audio" in kinds), ("--video", video, "video" in kinds),
                              ("--think/--no-think", think is not None, m.format.thinking),
                              ("--image-tokens", image_tokens, bool(m.inputs and m.inputs.budgets))):
        if given and not able:
            raise GemrunError(f"{flag}: this model cannot take it")

    def reply(messages: list[dict]):
        return m.events(m.chat_prompt(messages, think=think, image_tokens=image_tokens), params)

    repl = Repl(Conversation(system, image or [], audio or [], video or []), reply, lambda: report(m), err,
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
          dtype: Annotated[str, typer.Option(help="auto (on the CPU: float32 activations over packed weights, with "
                                             "a bf16 KV cache unless --kv-cache says) | float32 | bfloat16")] = "auto",
          mmproj: MmprojOpt = None,
          quantize: QuantOpt = None,
          log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
          draft: DraftOpt = None, draft_tokens: DraftTokens = 4, kv_cache: KvOpt = "auto",
          tp: TpOpt = None, prefill: PrefillOpt = None) -> None:
    """Serve the model over OpenAI- and Ollama-compatible HTTP APIs, batching concurrent requests."""
    import logging

    from ..server.app import create_app
    from ..server.lifecycle import Server, listen, server_config
    from ..server.settings import Settings, is_loopback

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
    from ..distributed import is_follower

    tp = check_tp(tp, draft)
    follower = is_follower()  # torchrun's ranks but 0 serve nothing: they load their part and follow rank 0
    listener = None if follower else listen(host, port)  # a port in use fails here, before anything is loaded
    torch_module()
    # auto: what `generate` and `chat` run (on the CPU float32 activations over the packed weights: decode 22%
    # faster than bf16 activations on the 270M, 8% on the 12B; batched rows stay bit-equal to each alone), with a
    # bf16 KV cache (llama.cpp's f16 bytes: half the pool and batch memory of f32, and faster attention at depth)
    serve_kv = "bf16" if kv_cache == "auto" and dtype == "auto" else kv_cache
    lost: list[str] = []

    def loader():
        from ..api import load

        m = load(model, device=device, dtype=dtype, max_context=max_context, mmproj=mmproj,
                 quantize=quantize, kv_cache=serve_kv, tp=tp, prefill=prefill)
        if hasattr(m.model, "on_lost"):  # a rank died: requests get 503, and the server exits non-zero
            m.model.on_lost = lambda reason: (lost.append(reason), setattr(server, "should_exit", True))
        return m

    if follower:
        loader()  # returns only on rank 0
    app_ = create_app(loader, settings)
    err.print(f"[dim]gemrun serving on http://{host}:{port} (OpenAI: /v1, Ollama: /api)[/dim]")
    server = Server(server_config(app_, settings, log_level))
    server.run(sockets=[listener])
    if lost:
        raise GemrunError(f"tensor parallelism failed: {lost[0]}")
