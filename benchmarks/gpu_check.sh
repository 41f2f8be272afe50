#!/usr/bin/env bash
# The GPU path, in one run (issue 19, part 3), for a session that has a CUDA machine. From the repository root:
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (the device tool's folder) or ./gpu_check_out
#
# 1. parity on CUDA against the reference (transformers), float32 and bfloat16: tiny Gemma 3, tiny Gemma 4, the
#    real 270M (max |logit gap|, top-1 agreement, peak GPU memory);
# 2. `gemrun bench` on the 270M (bf16, float32) and on a full-shape random Gemma 3 12B in bf16;
# 3. decode with torch.compile'd MLPs against eager, to see whether it pays;
# 4. tensor parallelism over NCCL: --tp 2 on two GPUs (greedy tokens equal --tp 1, bench), else one rank on NCCL.
# Each step has its own time limit; a failing step is recorded and the rest still run. About 10 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GEMRUN_CACHE="$OUT/cache"
PY="${PYTHON:-python}"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME SECONDS CMD...: run with a limit, keep its output, note its status
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  tail -n 20 "$OUT/$name.out" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || { echo "   FAILED ($rc): $(tail -n 3 "$OUT/$name.err")" | tee -a "$OUT/summary.txt"; }
}

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee -a "$OUT/summary.txt"

step parity 600 "$PY" - <<'EOF'
import json, sys
import torch
sys.path.insert(0, "tests")
import conftest  # noqa: F401  (torchvision stubs, as the test suite)
from tiny import hf_model, ours_from
import tiny_gemma4
import gemrun

def gap(a, b):
    a, b = a.float(), b.float()
    return {"max_logit_gap": (a - b).abs().max().item(), "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

dev = torch.device("cuda")
ids = torch.tensor([[2, *range(300, 364)]], device=dev)
for dtype in (torch.float32, torch.bfloat16):
    ref = hf_model(seed=0).to(dev)
    ours = ours_from(ref.cpu(), dtype).to(dev)
    ref = ref.to(dev)
    with torch.no_grad():
        print(json.dumps({"model": "tiny-gemma3", "dtype": str(dtype), **gap(ref(ids).logits, ours(ids, ours.make_caches()))}))
    g4 = tiny_gemma4.reference(seed=0).to(dev)
    text, _ = tiny_gemma4.ours(g4.cpu())
    text, g4 = text.to(dev, dtype), g4.to(dev)
    with torch.no_grad():
        print(json.dumps({"model": "tiny-gemma4", "dtype": str(dtype),
                          **gap(g4(input_ids=ids.clamp(max=499)).logits, text(ids.clamp(max=499), text.make_caches()))}))
from transformers import AutoModelForCausalLM
from gemrun.weights.embedded import default_model_path
path = default_model_path()
ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).to(dev).eval()
tokens = gemrun.load(device="cpu").tokenizer.encode(
    "The history of the city begins with a small settlement by the river, where the first settlers built their "
    "houses of wood and stone, and traded with the boats.", bos=True)
with torch.no_grad():
    want = ref(torch.tensor([tokens], device=dev)).logits[0]
for dtype in ("float32", "bfloat16"):
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    m = gemrun.load(device="cuda", dtype=dtype)
    got = m.logits(tokens)
    print(json.dumps({"model": "gemma-3-270m", "dtype": dtype, **gap(want, got),
                      "peak_gpu_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)}))
    del m
EOF

step bench-270m-bf16 300 "$PY" -m gemrun.cli bench --device cuda --dtype bfloat16 --repeat 2
step bench-270m-f32 300 "$PY" -m gemrun.cli bench --device cuda --dtype float32 --repeat 2
step make-12b 600 "$PY" -m gemrun.cli make-random --preset gemma-3-12b --format hf --quant bf16 "$OUT/g3-12b"
step bench-12b-bf16 600 "$PY" -m gemrun.cli bench -m "$OUT/g3-12b" --device cuda --dtype bfloat16 --repeat 1 \
  --prompt-tokens 512 --gen-tokens 64
log "bench-12b-int4: not run: gemrun has no CUDA int4 matmul yet (int4 checkpoints are dequantized to bf16 on CUDA)"

step compile-decode 600 "$PY" - <<'EOF'
import json, time
import torch
import gemrun
from gemrun.generate import Stats, generate_ids
from gemrun.sampling import SamplingParams

m = gemrun.load(device="cuda", dtype="bfloat16")
ids = m.tokenizer.encode("Once upon a time, in a land far away,", bos=True)
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

def tok_s():
    best = 0.0
    for _ in range(3):
        s = Stats()
        out = list(generate_ids(m.model, ids, params, set(), m.max_context, m.tokenizer.vocab_size, s))
        best = max(best, s.decode_tps)
    return best, out

eager, tokens = tok_s()
for layer in m.model.layers:  # the per-token matmuls (dense on CUDA); attention over the growing caches stays eager
    assert isinstance(layer.mlp.up_proj, torch.nn.Linear), "compile dense layers only (packed ones call C kernels)"
    layer.mlp = torch.compile(layer.mlp, dynamic=False)
compiled, tokens_c = tok_s()
print(json.dumps({"decode_tok_s_eager": round(eager, 1), "decode_tok_s_compiled_mlp": round(compiled, 1),
                  "same_tokens": tokens == tokens_c}))
EOF

if [ "$GPUS" -ge 2 ]; then
  step tp2-generate 600 bash -c "
    a=\$($PY -m gemrun.cli generate 'The capital of France is' --device cuda --dtype bfloat16 --temperature 0 -n 48 --tp 1)
    b=\$($PY -m gemrun.cli generate 'The capital of France is' --device cuda --dtype bfloat16 --temperature 0 -n 48 --tp 2)
    echo \"tp1: \$a\"; echo \"tp2: \$b\"; [ \"\$a\" = \"\$b\" ] && echo 'greedy tokens equal' || echo 'greedy tokens DIFFER'"
  step tp2-bench-12b 600 torchrun --nproc-per-node 2 -m gemrun.cli bench -m "$OUT/g3-12b" --device cuda \
    --dtype bfloat16 --repeat 1 --prompt-tokens 512 --gen-tokens 64 --tp 2
else
  step tp1-nccl 300 "$PY" - <<'EOF'
import json
import gemrun
from gemrun.api import Model
from gemrun.distributed import open_parallel
import torch.distributed as dist

one = gemrun.load(device="cuda", dtype="bfloat16")
loaded = open_parallel(1, None, "cuda", "bfloat16")  # one rank, collectives on NCCL
nccl = Model(loaded, loaded.tokenizer)
text = "The capital of France is"
a = one.generate(text, temperature=0, max_tokens=48)
b = nccl.generate(text, temperature=0, max_tokens=48)
print(json.dumps({"backend": dist.get_backend(), "same_text": a == b, "text": b}))
nccl.model.close()
EOF
fi
log "done: $OUT/summary.txt"
