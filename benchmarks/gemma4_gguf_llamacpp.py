"""llama.cpp (a native build) reads gemrun's Gemma 4 GGUF set: a tiny random Gemma 4 Unified checkpoint (the tests'
reference: text, image and audio embedders, an MTP assistant) converted by `gemrun convert` to the text model, the
mmproj and the drafter; llama-server greedy-decodes a text prompt given as token ids and the tokens are compared
with gemrun's. Then llama-mtmd-cli is given the mmproj and an image, and what it does is reported. Not CI.

    python benchmarks/gemma4_gguf_llamacpp.py --bin /work/llamacpp/build/bin [--quant f32|q8_0] [--keep DIR]

Prints one JSON object: the tokens of both engines, whether they agree, and the mtmd outcome.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def build(out: Path, quant: str) -> dict[str, Path]:
    """The tiny reference (sliding window 512, so that an image's tokens all fit it: llama.cpp and gemrun bound
    the image block by the window differently past it) with Google's template, converted."""
    import conftest  # noqa: F401  (torchvision stub, the checkout's tokenizer cache)
    from tiny_gemma4 import reference, reference_assistant, write_tiny_dir

    from gemrun.convert import convert

    root = write_tiny_dir(out / "hf", reference(seed=0, sliding_window=512))
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    template = (ROOT / "gemrun" / "templates" / "gemma4.jinja").read_text()
    (root / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": template}))
    reference_assistant(seed=0).save_pretrained(out / "assistant")
    files = {"text": out / "tiny-gemma4.gguf", "mmproj": out / "mmproj-tiny-gemma4.gguf",
             "draft": out / "tiny-gemma4-assistant.gguf"}
    convert(root, files["text"], quant, mmproj=files["mmproj"], mmproj_quant="f32" if quant == "f32" else "f16",
            draft=(out / "assistant", files["draft"]))
    return files


def gemrun_tokens(files: dict[str, Path], prompt: list[int], n: int, draft: bool = False) -> dict:
    import gemrun
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams

    m = gemrun.load(files["text"], device="cpu", dtype="float32", draft=files["draft"] if draft else None)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    stats = Stats()
    ids = list(generate_ids(m.model, prompt, params, set(), m.max_context, m.tokenizer.vocab_size, stats,
                            draft=m.draft))
    return {"tokens": ids, "drafted": stats.drafted_tokens, "accepted": stats.accepted_tokens}


def serve(binary: Path, files: dict[str, Path], port: int, mmproj: bool, draft: bool = False):
    """llama-server on the text GGUF (with the mmproj, the drafter); (process, base URL) once /health answers."""
    cmd = [str(binary / "llama-server"), "-m", str(files["text"]), "--port", str(port), "-t", "2", "-c", "1024",
           "--no-warmup", "-np", "1"] + (["--mmproj", str(files["mmproj"])] if mmproj else []) \
        + (["-md", str(files["draft"]), "--spec-type", "draft-mtp"] if draft else [])
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError("llama-server exited: " + log.read().decode(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("llama-server did not start")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


GREEDY = {"temperature": 0, "top_k": 1, "samplers": ["top_k"], "return_tokens": True, "cache_prompt": False,
          "ignore_eos": True}


def llama_tokens(binary: Path, files: dict[str, Path], prompt: list[int], n: int, port: int = 18431,
                 draft: bool = False) -> dict:
    """llama-server on the text GGUF (with `draft`: gemrun's drafter GGUF as its MTP draft model): /completion
    with the prompt as token ids, greedy, `n` tokens."""
    proc, url = serve(binary, files, port, mmproj=False, draft=draft)
    try:
        out = post(url + "/completion", {"prompt": prompt, "n_predict": n, **GREEDY})
        timings = out.get("timings", {})
        return {"tokens": out.get("tokens"), "drafted": timings.get("draft_n"),
                "accepted": timings.get("draft_n_accepted")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def image_agreement(binary: Path, files: dict[str, Path], out: Path, n: int, port: int = 18433) -> dict:
    """An image already at its target size (152 x 112: 19 x 14 patches of 8 px, no resizing on either side)
    between two text pieces: llama-server (mmproj) and gemrun greedy-decode the same prompt."""
    import base64
    import io

    from PIL import Image

    import gemrun
    from gemrun.generate import Prompt, Stats, generate_ids
    from gemrun.model.multimodal import media_blocks, prompt_embeddings
    from gemrun.processing.source import MediaRequest
    from gemrun.sampling import SamplingParams

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (112, 152, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, "PNG")
    before, after = "the cat ", " in the hat"
    m = gemrun.load(files["text"], mmproj=files["mmproj"], device="cpu", dtype="float32")
    item = m.inputs.prepare("image", image, MediaRequest(image_tokens=280))
    cfg = m.media.config
    ids = ([m.tokenizer.bos_id] + m.tokenizer.encode(before) + [cfg.boi_token_id]
           + [cfg.image_token_id] * item.num_soft_tokens + [cfg.eoi_token_id] + m.tokenizer.encode(after))
    t = torch_tensor(ids)
    embeds = prompt_embeddings(m.model, t, m.inputs.embed([item]))
    prompt = Prompt(ids, embeds, media_blocks(t, m.inputs.vision_ids))
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    ours = list(generate_ids(m.model, prompt, params, set(), m.max_context, m.tokenizer.vocab_size, Stats()))
    proc, url = serve(binary, files, port, mmproj=True)
    try:
        marker = json.loads(urllib.request.urlopen(url + "/props", timeout=10).read())["media_marker"]
        body = {"prompt": {"prompt_string": before + marker + after,
                           "multimodal_data": [base64.b64encode(png.getvalue()).decode()]}, "n_predict": n, **GREEDY}
        theirs = post(url + "/completion", body)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"image_tokens": item.num_soft_tokens, "prompt_tokens": len(ids),
            "llama_prompt_tokens": theirs.get("tokens_evaluated"), "gemrun": ours, "llama_cpp": theirs.get("tokens"),
            "agree": ours == theirs.get("tokens")}


def torch_tensor(ids: list[int]):
    import torch

    return torch.tensor(ids)


def mtmd(binary: Path, files: dict[str, Path], out: Path) -> dict:
    from PIL import Image

    image = out / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(image)
    cmd = [str(binary / "llama-mtmd-cli"), "-m", str(files["text"]), "--mmproj", str(files["mmproj"]),
           "--image", str(image), "-p", "Describe the image.", "-n", "8", "--temp", "0", "-t", "2", "-c", "1024",
           "--jinja"]
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if any(k in x for k in (
        "projector", "patch_size", "error", "failed", "image", "encod", "decod", "n_mel_bins"))
        and "control-looking" not in x]
    return {"returncode": r.returncode, "stdout_tail": r.stdout[-400:], "log": lines[-25:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, default=Path("/work/llamacpp/build/bin"))
    ap.add_argument("--quant", default="f32")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--keep", type=Path, help="directory for the converted files (default: a temporary one)")
    args = ap.parse_args()
    out = args.keep or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    files = build(out, args.quant)
    prompt = [2, 11, 45, 87, 120, 33, 254, 301, 77, 19, 8, 410, 99, 64, 12]
    ours = gemrun_tokens(files, prompt, args.tokens)["tokens"]
    theirs = llama_tokens(args.bin, files, prompt, args.tokens)
    result = {"files": {k: str(v) for k, v in files.items()}, "quant": args.quant, "prompt": prompt,
              "gemrun": ours, "llama_cpp": theirs.get("tokens"), "agree": ours == theirs.get("tokens")}
    # the drafter GGUF in both engines: greedy output unchanged, drafts counted (random weights accept little)
    spec = {"gemrun": gemrun_tokens(files, prompt, args.tokens, draft=True),
            "llama_cpp": llama_tokens(args.bin, files, prompt, args.tokens, port=18435, draft=True)}
    result["speculative"] = {k: {"same_tokens_as_plain": v["tokens"] == ours, "drafted": v["drafted"],
                                 "accepted": v["accepted"]} for k, v in spec.items()}
    result["image"] = image_agreement(args.bin, files, out, args.tokens)
    result["mtmd_image"] = mtmd(args.bin, files, out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
