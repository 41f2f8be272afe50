"""The wider hardening pass (issue 14; shared/reference/hardening.md is the checklist): every family of untrusted
input, mutated or hand-made, counted by outcome.

    python benchmarks/hardening_pass.py                      # everything (hours on 2 cores: the 270M dominates)
    python benchmarks/hardening_pass.py --section media      # one section: files, media, http, injection
    python benchmarks/hardening_pass.py --only gguf-270m     # single rows (names as in the table)
    python benchmarks/hardening_pass.py --count 1000 --count-270m 60 --examples 30   # short: see RESULTS.md
    python benchmarks/hardening_pass.py --report             # the table of the results saved so far

files      GGUF mutants of the real embedded 270M through `gemrun.load` (tests/gguf_fuzz.py gemma3-text), a tiny
           Gemma 3 mmproj, tiny safetensors HF directories (tests/input_fuzz.py), the tiny Gemma 4 trio's text
           model, mmproj and drafter: each in a supervised child (6 GiB address space, an alarm per mutant,
           restarted past a mutant that kills or hangs it: tests/fuzz.py).
media      PNG/JPEG/WebP/GIF/BMP, WAV/FLAC/OGG/MP3 and MP4/WebM/AVI mutants through the image, audio and video
           processors (2 GiB).
http       schemathesis over the server's OpenAPI spec (every route, the embedded 270M; benchmarks/fuzz_hooks.py logs
           each call), then hand-written hostile requests (`hostile_cases`), each counted as a clean 4xx, a 2xx, a 5xx
           or a hang; a 2xx to a body generated to break the schema, or to a hostile request that must be refused, is
           a silent accept.
injection  tests/test_injection.py (every control token whole and split, every role, both families) and the same
           spellings through the OpenAI and Ollama APIs (`server_injection`): a control token the template did not
           write is an injection.

Each row's counts go to OUT/ROW.json (default /tmp/gemrun-hardening); the table (JSON, then Markdown) is made from
all of them, so sections run separately add up. A row's outcomes: clean rejections, valid loads or results,
crashes, hangs, OOMs and silent accepts (a broken input that loads or answers: tests/fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # this checkout's gemrun, not an installed one

MEDIA = ["png", "jpeg", "webp", "gif", "bmp", "wav", "flac", "ogg", "mp3", "mp4", "webm", "avi"]
FILES = ["gguf-270m", "mmproj-gemma3", "safetensors", "gemma4-text", "gemma4-mmproj", "gemma4-draft"]
SECTIONS = {"files": FILES, "media": MEDIA, "http": ["http-schemathesis", "http-hostile"],
            "injection": ["injection-templates", "injection-server"]}
COLUMNS = ["cases", "rejected", "accepted", "crashes", "hangs", "oom", "silent"]


def save(out: Path, row: str, stats: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{row}.json").write_text(json.dumps({"row": row, **stats}, indent=1))
    shown = {k: v for k, v in stats.items() if k != "examples"}
    print(f"{row}: {json.dumps(shown)}", flush=True)
    for e in stats.get("examples", [])[:8]:
        print(f"    {e}", flush=True)


# --- files --------------------------------------------------------------------------------------------------------

def fixtures(work: Path) -> dict[str, Path]:
    """The tiny files the file rows mutate (made once into `work`)."""
    import conftest  # noqa: F401 - lets transformers import beside this torch (see tests/conftest.py)

    work.mkdir(parents=True, exist_ok=True)
    made = work / "done"
    paths = {"hf": work / "hf", "mmtext": work / "mmtext.gguf", "mmproj": work / "mmproj.gguf",
             "g4": work / "g4"}
    if made.exists():
        return paths
    from tiny import hf_mm_model, write_hf_dir, write_mm_gguf
    from tiny_gemma4 import reference, reference_assistant, write_tiny_dir

    from gemrun.convert import convert

    write_hf_dir(paths["hf"])
    write_mm_gguf(hf_mm_model(seed=4), paths["mmtext"], paths["mmproj"], quant="f16")
    g4 = paths["g4"]
    root = write_tiny_dir(g4 / "hf", reference(seed=0))
    reference_assistant(seed=0).save_pretrained(g4 / "assistant")
    convert(root, g4 / "t.gguf", "f32", mmproj=g4 / "mm.gguf", mmproj_quant="f32", draft=(g4 / "assistant",
                                                                                          g4 / "d.gguf"))
    made.write_text("ok")
    return paths


def file_row(row: str, count: int, seed: int, work: Path) -> dict:
    from fuzz import run_supervised

    if row == "gguf-270m":
        from gemrun.weights.embedded import default_model_path

        return run_supervised("gguf_fuzz.py", [str(default_model_path()), str(count), str(seed), "gemma3-text"],
                              count, stall=600, setup=1200)
    p = fixtures(work)
    if row == "mmproj-gemma3":
        args = [str(p["mmproj"]), str(count), str(seed), "gemma3-mmproj", str(p["mmtext"])]
        return run_supervised("gguf_fuzz.py", args, count)
    if row == "safetensors":
        return run_supervised("input_fuzz.py", ["safetensors", str(count), str(seed), str(p["hf"])], count)
    file = {"gemma4-text": "t.gguf", "gemma4-mmproj": "mm.gguf", "gemma4-draft": "d.gguf"}[row]
    args = [str(p["g4"] / file), str(count), str(seed), row, str(p["g4"] / "t.gguf")]
    return run_supervised("gguf_fuzz.py", args, count)


def media_row(family: str, count: int, seed: int) -> dict:
    from fuzz import run_supervised

    return run_supervised("input_fuzz.py", [family, str(count), str(seed)], count, stall=60, setup=300)


# --- http -------------------------------------------------------------------------------------------------------

HTTP_TIMEOUT = 60.0  # seconds a request may take before it counts as a hang


def live_server():
    """The embedded 270M behind a real server (a short context, 16 tokens unless asked and a 1 MiB body limit keep
    fuzzed requests short)."""
    from server_util import LiveServer

    import gemrun

    model = gemrun.load(None, dtype="bfloat16", max_context=512)
    return LiveServer(lambda: model, max_batch=2, max_queue=16, request_timeout=int(HTTP_TIMEOUT), max_body=1 << 20,
                      body_timeout=10, max_tokens_default=16)


def tally(outcomes: list[tuple[str, str]]) -> dict:
    """Counts of (outcome, example) pairs in the table's columns."""
    stats = {"cases": len(outcomes), **{c: 0 for c in COLUMNS[1:]}, "examples": []}
    for outcome, example in outcomes:
        stats[outcome] += 1
        if outcome != "rejected" and outcome != "accepted" and len(stats["examples"]) < 12:
            stats["examples"].append(example)
    return stats


def http_row(row: str, examples: int, seed: int, out: Path, minutes: float) -> dict:
    with live_server() as s:
        return schemathesis_row(s, examples, seed, out, minutes) if row == "http-schemathesis" else hostile_row(s)


def schemathesis_row(s, examples: int, seed: int, out: Path, minutes: float) -> dict:
    """schemathesis over every route of the OpenAPI spec; each call counted by its status: 4xx rejected, 2xx/3xx
    accepted, 5xx a crash, no response within HTTP_TIMEOUT a hang, and a 2xx to a request schemathesis generated to
    violate the schema (negative mode, not edited by the hooks) a silent accept."""
    import shutil

    import httpx

    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        return {"cases": 0, "note": "schemathesis is not installed"}
    log = out / "schemathesis.jsonl"
    log.unlink(missing_ok=True)
    name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "GEMRUN_FUZZ_MODEL": name, "GEMRUN_FUZZ_LOG": str(log),
           "GEMRUN_FUZZ_MAX_TOKENS": "8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))}
    cmd = [exe, "run", s.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(examples),
           "--seed", str(seed), "--workers", "1", "--request-timeout", str(HTTP_TIMEOUT), "--continue-on-failure"]
    print("$", " ".join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out,
                            timeout=minutes * 60)
        (out / "schemathesis.out").write_text(rc.stdout)
        ended = f"exit {rc.returncode}"
    except subprocess.TimeoutExpired as e:
        (out / "schemathesis.out").write_text(e.stdout.decode(errors="replace") if e.stdout else "")
        ended = f"stopped after {minutes:g} min"
    outcomes, pending = [], None
    for line in log.read_text().splitlines() if log.exists() else []:
        msg = json.loads(line)
        if "status" not in msg:
            if pending is not None:
                outcomes.append(("hangs", f"{pending}: no response"))
            pending = msg["op"]
            continue
        pending, code, op = None, msg["status"], msg["op"]
        if code >= 500:
            outcomes.append(("crashes", f"{op}: {code}"))
        elif code >= 400:
            outcomes.append(("rejected", ""))
        elif msg["negative"]:
            outcomes.append(("silent", f"{op}: {code} to a schema-violating request"))
        else:
            outcomes.append(("accepted", ""))
    if pending is not None:
        outcomes.append(("hangs", f"{pending}: no response"))
    stats = tally(outcomes)
    stats["note"] = f"schemathesis {examples} examples per operation, {ended}"
    return stats


def hostile_cases(model: str, port: int) -> list[tuple[str, str, str, dict, bool]]:
    """(name, method, path, httpx keywords, must be refused) of hand-written hostile requests. A request that must be
    refused and is answered 2xx is a silent accept; the others may be answered either way, never with a 5xx."""
    def chat(**kw):
        return {"json": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}}

    def image(url: str):
        return chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                           {"type": "image_url", "image_url": {"url": url}}]}])

    import base64
    import struct
    import zlib

    def png(width: int, height: int) -> str:  # a valid header claiming a huge image over a tiny stream
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        raw += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
        return "data:image/png;base64," + base64.b64encode(raw).decode()

    def raw(length: str, body: bytes) -> bytes:  # a request httpx would not send
        return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {length}\r\n\r\n").encode() + body

    deep = "[" * 100_000 + "]" * 100_000
    json_headers = {"content-type": "application/json"}
    cases = [
        ("malformed JSON", "POST", "/v1/chat/completions", {"content": b"{\"model\": ", "headers": json_headers}, True),
        ("invalid UTF-8", "POST", "/v1/chat/completions", {"content": b"{\"model\": \"\xff\xfe\"}",
                                                           "headers": json_headers}, True),
        ("top-level array", "POST", "/v1/chat/completions", {"json": [1, 2, 3]}, True),
        ("top-level null", "POST", "/v1/chat/completions", {"json": None}, True),
        ("nesting 100k deep", "POST", "/v1/chat/completions", {"content": deep.encode(), "headers": json_headers},
         True),
        ("body over the limit", "POST", "/v1/chat/completions", {"content": b"{" + b" " * (2 << 20) + b"}",
                                                                 "headers": json_headers}, True),
        ("content-length not a number", "POST", "/v1/chat/completions", {"raw": raw("abc", b"{}")}, True),
        ("content-length negative", "POST", "/v1/chat/completions", {"raw": raw("-5", b"{}")}, True),
        ("content-length past the body (client goes quiet)", "POST", "/v1/chat/completions",
         {"raw": raw("1000", b"{}")}, True),
        ("text/plain body", "POST", "/v1/chat/completions", {"content": b"hello", "headers":
                                                             {"content-type": "text/plain"}}, True),
        ("no messages", "POST", "/v1/chat/completions", chat(messages=[]), True),
        ("unknown role", "POST", "/v1/chat/completions", chat(messages=[{"role": "root", "content": "hi"}]), True),
        ("content an integer", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), True),
        ("max_tokens -1", "POST", "/v1/chat/completions", chat(max_tokens=-1), True),
        ("max_tokens 10^30", "POST", "/v1/chat/completions", chat(max_tokens=10**30), True),
        ("temperature NaN", "POST", "/v1/chat/completions", {"content": json.dumps(chat(temperature=float("nan"))
                                                                                   ["json"]).encode(),
                                                             "headers": json_headers}, True),
        ("temperature -1", "POST", "/v1/chat/completions", chat(temperature=-1), True),
        ("top_p 2", "POST", "/v1/chat/completions", chat(top_p=2), True),
        ("n 10^6", "POST", "/v1/chat/completions", chat(n=10**6), True),
        ("n 0", "POST", "/v1/chat/completions", chat(n=0), True),
        ("top_logprobs 10^6", "POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=10**6), True),
        ("100k stop strings", "POST", "/v1/chat/completions", chat(stop=["x"] * 100_000), True),
        ("seed 2^80", "POST", "/v1/chat/completions", chat(seed=2**80), False),
        ("unknown model", "POST", "/v1/chat/completions", chat(model="no-such-model"), True),
        ("logit_bias past the vocabulary", "POST", "/v1/chat/completions", chat(logit_bias={"999999999": 5}), True),
        ("image file://", "POST", "/v1/chat/completions", image("file:///etc/passwd"), True),
        ("image from the server itself", "POST", "/v1/chat/completions",
         image(f"http://127.0.0.1:{port}/metrics"), True),
        ("image data URL not base64", "POST", "/v1/chat/completions", image("data:image/png;base64,!!!"), True),
        ("image data URL of text", "POST", "/v1/chat/completions",
         image("data:image/png;base64," + base64.b64encode(b"hello world").decode()), True),
        ("PNG claiming 10^5 x 10^5 pixels", "POST", "/v1/chat/completions", image(png(100_000, 100_000)), True),
        ("tool with a non-object schema", "POST", "/v1/chat/completions",
         chat(tools=[{"type": "function", "function": {"name": "f", "parameters": 5}}]), True),
        ("tool_choice naming no tool", "POST", "/v1/chat/completions",
         chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              tool_choice={"type": "function", "function": {"name": "g"}}), True),
        ("json_schema with a self-reference", "POST", "/v1/chat/completions",
         chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
             "$ref": "#/$defs/a", "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}}}}), False),
        ("lone surrogate in content", "POST", "/v1/chat/completions",
         {"content": b'{"model": "' + model.encode() + b'", "max_tokens": 2, "messages": [{"role": "user", '
          b'"content": "\\ud800"}]}', "headers": json_headers}, False),
        ("prompt past the context", "POST", "/v1/completions",
         {"json": {"model": model, "prompt": "word " * 5000, "max_tokens": 2}}, True),
        ("prompt token ids past the vocabulary", "POST", "/v1/completions",
         {"json": {"model": model, "prompt": [2, 10**9], "max_tokens": 2}}, True),
        ("tokenize both prompt and messages", "POST", "/tokenize",
         {"json": {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}}, True),
        ("detokenize -1", "POST", "/detokenize", {"json": {"tokens": [-1]}}, True),
        ("detokenize 2^63", "POST", "/detokenize", {"json": {"tokens": [2**63]}}, True),
        ("ollama num_ctx 2^40", "POST", "/api/chat",
         {"json": {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"num_ctx": 2**40, "num_predict": 2}}}, False),
        ("ollama image not base64", "POST", "/api/generate",
         {"json": {"model": model, "prompt": "hi", "images": ["!!!"], "stream": False, "options": {"num_predict": 2}}},
         True),
        ("ollama show unknown model", "POST", "/api/show", {"json": {"model": "nope"}}, True),
        ("responses input an integer", "POST", "/v1/responses", {"json": {"model": model, "input": 5}}, True),
        ("GET on a POST route", "GET", "/v1/chat/completions", {}, True),
        ("unknown route", "POST", "/v1/../../etc/passwd", {"json": {}}, True),
    ]
    return cases


def raw_status(port: int, request: bytes) -> int:
    """The status of a request sent as bytes (httpx.TimeoutException past HTTP_TIMEOUT, httpx.ReadError when the
    server closes without answering)."""
    import socket

    import httpx

    with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(request)
        try:
            head = sock.recv(64)
        except TimeoutError as e:
            raise httpx.ReadTimeout("no answer") from e
    if not head.startswith(b"HTTP/1.1 "):
        raise httpx.ReadError(f"no status line: {head[:40]!r}")
    return int(head[9:12])


def hostile_row(s) -> dict:
    import httpx

    name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
    outcomes = []
    with httpx.Client(base_url=s.url, timeout=HTTP_TIMEOUT) as client:
        for label, method, path, kw, refuse in hostile_cases(name, s.port):
            try:
                code = raw_status(s.port, kw["raw"]) if "raw" in kw else client.request(method, path, **kw).status_code
            except httpx.TimeoutException:
                outcomes.append(("hangs", f"{label}: no response in {HTTP_TIMEOUT:g} s"))
                continue
            except httpx.LocalProtocolError as e:  # the client would not send it: not a case
                print(f"    {label}: not sent ({e})", flush=True)
                continue
            except httpx.HTTPError as e:
                outcomes.append(("crashes", f"{label}: connection failed ({type(e).__name__})"))
                continue
            if code >= 500:
                outcomes.append(("crashes", f"{label}: {code}"))
            elif code >= 400:
                outcomes.append(("rejected", ""))
            elif refuse:
                outcomes.append(("silent", f"{label}: {code}"))
            else:
                outcomes.append(("accepted", ""))
            print(f"    {label}: {code}", flush=True)
    stats = tally(outcomes)
    stats["note"] = "hand-written (hostile_cases)"
    return stats


# --- injection ----------------------------------------------------------------------------------------------------

def injection_row(row: str, unused_step: int) -> dict:
    return template_injection() if row == "injection-templates" else server_injection(unused_step)


def _controls(tok, ids) -> dict:
    from collections import Counter

    controls = set(tok.specials.values())
    return Counter(i for i in ids if i in controls)


def _injected(tok, fmt, role: str, batch: list[tuple[str, str]]) -> bool:
    """Whether a conversation of these cut spellings holds a control token that of plain text does not."""
    from test_injection import conversation

    parts = [{"type": "text", "text": t} for a, b in batch for t in ("x" + a, b + "y")]
    plain = [{"type": "text", "text": t} for _ in batch for t in ("x", "y")]
    got = fmt.encode(fmt.render(conversation(role, parts)).text)
    want = fmt.encode(fmt.render(conversation(role, plain)).text)
    return _controls(tok, got) != _controls(tok, want)


def template_injection() -> dict:
    """tests/test_injection.py's check, counted per spelling: every control token of both families whole and cut at
    every position over two content parts, in every role; a spelling whose conversation holds a control token the
    plain conversation does not is a silent accept (an injection)."""
    from test_injection import pieces
    from tiny4 import gemma4_tokenizer

    from gemrun.formats import format_for
    from gemrun.tokenizer import from_gguf_metadata
    from gemrun.weights.embedded import default_model_path
    from gemrun.weights.gguf import GGUFFile

    outcomes = []
    for family, tok in (("gemma3", from_gguf_metadata(GGUFFile(default_model_path()).metadata)),
                        ("gemma4", gemma4_tokenizer())):
        fmt = format_for(tok)
        cuts = pieces(sorted(tok.specials))
        for role in ("system", "user", "assistant", "tool"):
            for start in range(0, len(cuts), 1500):
                batch = cuts[start:start + 1500]
                bad = [p for p in batch if _injected(tok, fmt, role, [p])] if _injected(tok, fmt, role, batch) else []
                outcomes += [("silent", f"{family} {role}: {a + b!r}") for a, b in bad]
                outcomes += [("rejected", "")] * (len(batch) - len(bad))  # stayed text: the injection refused
    stats = tally(outcomes)
    stats["note"] = "spellings x roles, both families; 'clean rejections' = stayed text"
    return stats


def _content(api: str, batch: list[tuple[str, str]], plain: bool = False):
    """User content of cut spellings (or of the plain text around them): two parts each on the OpenAI API, one
    string on Ollama's."""
    if api == "ollama":
        return " ".join("x" if plain else "x" + a + b for a, b in batch)
    return [{"type": "text", "text": t} for a, b in batch for t in (("x", "y") if plain else ("x" + a, b + "y"))]


def server_injection(unused_step: int = 1) -> dict:
    """Gemma 3's control tokens spelled in user content through /v1/chat/completions and /api/chat of the embedded
    270M: the named ones (<start_of_turn>, <bos>, ...) whole and, on the OpenAI API, cut at every position over two
    content parts; every `unused_step`-th of the 6242 <unusedN> whole (tests/test_injection.py renders them all).
    The prompt the server builds (its ids, recorded from the service) must hold the same control tokens as the same
    request with plain text."""
    import httpx

    outcomes = []
    with live_server() as s:
        service = s.app.state.service
        tok, seen = service.tokenizer, []
        original = service.chat_prompt

        async def recording(*a, **kw):
            prompt = await original(*a, **kw)
            seen.append(list(prompt.ids))
            return prompt

        service.chat_prompt = recording
        name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]

        def prompt_of(api: str, content) -> list[int]:
            seen.clear()
            if api == "openai":
                body = {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
                r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT)
            else:
                body = {"model": name, "messages": [{"role": "user", "content": content}], "stream": False,
                        "options": {"num_predict": 1}}
                r = httpx.post(s.url + "/api/chat", json=body, timeout=HTTP_TIMEOUT)
            if r.status_code >= 500 or not seen:
                raise RuntimeError(f"{api}: {r.status_code} {r.text[:200]}")
            return seen[-1]

        named = sorted(sp for sp in tok.specials if not sp.startswith("<unused"))
        unused = sorted(sp for sp in tok.specials if sp.startswith("<unused"))[::unused_step]
        batch_size, plain = 40, {}
        for api in ("openai", "ollama"):
            cases = [(sp, "") for sp in named + unused]
            if api == "openai":  # the named ones also cut at every position over two parts the template joins
                cases += [(sp[:k], sp[k:]) for sp in named for k in range(1, len(sp))]

            def injected(batch, api=api) -> bool:
                if (api, len(batch)) not in plain:
                    plain[api, len(batch)] = _controls(tok, prompt_of(api, _content(api, batch, plain=True)))
                return _controls(tok, prompt_of(api, _content(api, batch))) != plain[api, len(batch)]

            for start in range(0, len(cases), batch_size):
                batch = cases[start:start + batch_size]
                try:
                    bad = [p for p in batch if injected([p])] if injected(batch) else []
                except (RuntimeError, httpx.HTTPError) as e:
                    outcomes += [("crashes", f"{api} batch {start}: {e}"[:300])] * len(batch)
                    continue
                outcomes += [("silent", f"{api}: {a + b!r}") for a, b in bad]
                outcomes += [("rejected", "")] * (len(batch) - len(bad))
    stats = tally(outcomes)
    stats["note"] = (f"Gemma 3 control tokens (named; 1 in {unused_step} <unusedN>) in user content via OpenAI (whole, "
                     "split) and Ollama (whole); 'clean rejections' = stayed text")
    return stats


# --- the table ----------------------------------------------------------------------------------------------------

def table(out: Path) -> list[dict]:
    order = [r for rows in SECTIONS.values() for r in rows]
    found = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    rows = []
    for name in order + sorted(set(found) - set(order)):
        if name in found:
            r = found[name]
            rows.append({"row": name, "cases": r.get("cases", r.get("mutants", 0)),
                         **{c: r.get(c, 0) for c in COLUMNS[1:]}, "note": r.get("note", "")})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["row", "cases", "clean rejections", "valid", "crashes", "hangs", "OOMs", "silent accepts", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in ["row", *COLUMNS, "note"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", action="append", choices=list(SECTIONS), help="run these sections (default: all)")
    ap.add_argument("--only", action="append", help="run only these rows")
    ap.add_argument("--report", action="store_true", help="only print the table of the saved results")
    ap.add_argument("--count", type=int, default=2000, help="mutants per model-file row")
    ap.add_argument("--count-270m", type=int, help="mutants of the embedded 270M GGUF (default: --count); each "
                    "loads the real model, so a short pass gives it far fewer")
    ap.add_argument("--media-count", type=int, default=500, help="mutants per media family")
    ap.add_argument("--examples", type=int, default=80, help="schemathesis examples per route")
    ap.add_argument("--http-minutes", type=float, default=120, help="schemathesis is stopped after this long (the "
                    "calls made so far are counted)")
    ap.add_argument("--unused-step", type=int, default=1, help="injection-server: every Nth <unusedN> token (the "
                    "named control tokens always)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gemrun-hardening"))
    args = ap.parse_args()
    os.environ.setdefault("GEMRUN_CACHE", str(ROOT / ".cache" / "gemrun"))
    if not args.report:
        wanted = args.only or [r for s in (args.section or list(SECTIONS)) for r in SECTIONS[s]]
        for row in wanted:
            t0 = time.monotonic()
            if row in FILES:
                n = args.count_270m if row == "gguf-270m" and args.count_270m is not None else args.count
                stats = file_row(row, n, args.seed, args.out / "work")
            elif row in MEDIA:
                stats = media_row(row, args.media_count, args.seed)
            elif row.startswith("http"):
                stats = http_row(row, args.examples, args.seed, args.out, args.http_minutes)
            elif row.startswith("injection"):
                stats = injection_row(row, args.unused_step)
            else:
                sys.exit(f"unknown row {row!r}")
            stats["seconds"] = round(time.monotonic() - t0)
            save(args.out, row, stats)
    rows = table(args.out)
    print(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
