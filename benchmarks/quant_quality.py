"""What each quantization format costs on the real Gemma 3 270M, as a markdown table for RESULTS.md.

The reference is the embedded Q4_K_M file dequantized to a bf16 HF directory (`gemrun convert`). Every format is
made from that directory by `gemrun convert`, and llama.cpp's own quantizer (llama-cpp-python, run from its venv)
makes Q8_0 / Q4_0 / Q4_K_M from our bf16 GGUF of the same weights. Each is scored with `gemrun quality`,
dequantized to float32 (the cost of the format alone), teacher-forced over TEXT against the reference in float32.

    python benchmarks/quant_quality.py --text /usr/share/common-licenses/GPL-3 --tokens 2048 --work /tmp/qq
    python benchmarks/quant_quality.py --only Q4_K     # score only the rows whose name contains Q4_K
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""


def gemrun(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "gemrun.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gemrun {' '.join(args)} failed: {r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/gemrun-quant-quality")
    ap.add_argument("--llama-python", default="/opt/llamacpp-venv/bin/python")
    ap.add_argument("--only", default="", help="score only the formats whose name contains this")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from gemrun.tokenizer import from_directory
    from gemrun.weights.embedded import default_model_path

    ref = work / "ref-bf16"
    if not ref.exists():
        gemrun("convert", str(default_model_path()), str(ref), "--quant", "bf16")
    tok = from_directory(ref)
    ids = tok.encode(Path(args.text).read_text())[: args.tokens]
    text = work / "text.txt"
    text.write_text(tok.decode(ids))

    formats: list[tuple[str, Path]] = []
    for name, out, extra in [("gemrun GGUF Q8_0", "q8_0.gguf", ["--quant", "q8_0"]),
                             ("gemrun GGUF Q4_0", "q4_0.gguf", ["--quant", "q4_0"]),
                             ("gemrun GGUF Q5_1", "q5_1.gguf", ["--quant", "q5_1"]),
                             ("gemrun GGUF Q4_K (Q5_0 where rows are not of 256)", "q4_k.gguf", ["--quant", "q4_k"]),
                             ("gemrun int4 per channel", "int4-channel", ["--quant", "int4-channel"]),
                             ("gemrun int4 per block of 32", "int4-block32", ["--quant", "int4-block"]),
                             ("gemrun int4 per block of 128", "int4-block128", ["--quant", "int4-block",
                                                                                "--group-size", "128"]),
                             ("gemrun fp8 e4m3, per-channel scales", "fp8-channel", ["--quant", "fp8"]),
                             ("gemrun fp8 e4m3, per-tensor scale", "fp8-tensor", ["--quant", "fp8",
                                                                                  "--fp8-scales", "tensor"])]:
        if args.only not in name:
            continue
        path = work / out
        if not path.exists():
            gemrun("convert", str(ref), str(path), *extra)
        formats.append((name, path))
    bf16_gguf = work / "bf16.gguf"
    if not bf16_gguf.exists():
        gemrun("convert", str(ref), str(bf16_gguf), "--quant", "bf16")
    if Path(args.llama_python).exists():
        for name, ftype in LLAMA_FTYPES.items():
            if args.only not in f"llama.cpp {name}":
                continue
            path = work / f"llama-{name}.gguf"
            if not path.exists():
                r = subprocess.run([args.llama_python, "-c", QUANTIZE, str(bf16_gguf), str(path), str(ftype)],
                                   capture_output=True, text=True)
                if r.returncode:
                    print(f"llama.cpp quantize {name} failed: {r.stderr[-500:]}", file=sys.stderr)
                    continue
            formats.append((f"llama.cpp {name}", path))

    print("| format | size MiB | perplexity | ref perplexity | mean KL | max KL | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for name, path in formats:
        res = json.loads(gemrun("quality", str(text), "--model", str(path), "--ref", str(ref), "--dtype", "float32",
                                "--ref-dtype", "float32", "--context", "1024", "--chunk", "256"))
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.glob("*.safetensors")))
        print(f"| {name} | {size / 2**20:.0f} | {res['perplexity']:.3f} | {res['ref_perplexity']:.3f} | "
              f"{res['kl_mean']:.5f} | {res['kl_max']:.3f} | {res['top1_agreement']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
