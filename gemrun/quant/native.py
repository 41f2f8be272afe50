"""gemrun's native CPU kernels: the AVX-512 VNNI matrix products of `q4q8.c`, the small fused decode-step
operations of `ops.c` (norms, RoPE, one token's attention, a Gemma 3 block around its attention) and the
long-cache attention of `attn.c` (AVX-512 BF16 CPUs only), compiled with the system C compiler on first use,
cached by source hash, called through ctypes. Where the CPU lacks the instructions or no compiler is found,
`available()` is False and the packed modules fall back to PyTorch's own weight-only kernels (set GEMRUN_NATIVE=0
to force that)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("gemrun")
SOURCES = [Path(__file__).with_name(name) for name in ("q4q8.c", "ops.c", "attn.c")]
HEADERS = [Path(__file__).with_name("vec.h")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp",
         "-shared", "-fPIC"]
NEEDED = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"}
GROUP = 32
DENSE_ROWS = 64  # from this many activation rows on (long prompts) the prefill kernel (PREFILL) runs; batched
# decoding stays below it (the engine's batch limit), so a sequence's decode never changes kernels

MAX_TOGETHER = 8  # matrices in one `mm` call (gemrun_mm's bound)


class Matrix(ctypes.Structure):
    """q4q8.c's `matrix`: one packed weight (N rows), its fp16 scales and mins (mins NULL: min = -zero * scale),
    5-bit weights' plane of high bits."""

    _fields_ = [("q", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("zero", ctypes.c_int64), ("n", ctypes.c_int64), ("bits", ctypes.c_int64), ("high", ctypes.c_void_p)]


def matrix(bits: int, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, zero: int,
           high: torch.Tensor | None = None) -> Matrix:
    """The kernels' view of a packed weight (it holds pointers: the tensors must stay alive and unmoved)."""
    return Matrix(q.data_ptr(), scales.data_ptr(), _ptr(mins), zero, q.shape[0], bits, _ptr(high))


class Plan:
    """Packed weights that share their input, as one `mm` call takes them: made once, not on every token."""

    def __init__(self, matrices: list[Matrix]):
        if len(matrices) > MAX_TOGETHER:
            raise ValueError(f"at most {MAX_TOGETHER} matrices at once")
        self.matrices = matrices  # the array below copies them; kept for their sizes
        self.array = (Matrix * len(matrices))(*matrices)
        self.count, self.n = len(matrices), sum(w.n for w in matrices)


PREFILLS = ("auto", "exact", "bf16", "int8")
# the kernel of long prompts (DENSE_ROWS rows and more): "exact" the decode kernel (two int8 levels per activation,
# batch-invariant), "bf16" dequantized tiles through a dense bf16 matmul, "int8" one int8 level per block of 32 in
# tiles of many rows; "auto" see `prefill_kernel`. GEMRUN_PREFILL sets it for a process, `--prefill` per command.
PREFILL = "auto"


def set_prefill(kind: str) -> None:
    """Choose the kernel of long prompts for this process (PREFILLS)."""
    global PREFILL
    if kind not in PREFILLS:
        raise ValueError(f"prefill must be one of {', '.join(PREFILLS)}, got {kind!r}")
    PREFILL = kind


if os.environ.get("GEMRUN_PREFILL"):
    set_prefill(os.environ["GEMRUN_PREFILL"])
_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build() -> ctypes.CDLL | None:
    if os.environ.get("GEMRUN_NATIVE", "1") == "0":
        return None
    missing = NEEDED - _cpu_flags()
    if missing:
        log.info("native kernels off: the CPU lacks %s", ", ".join(sorted(missing)))
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        log.warning("native kernels off: no C compiler found (packed weights use PyTorch's kernels)")
        return None
    from ..tokenizer import cache_dir

    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"q4q8-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp_so), "-lm"], capture_output=True,
                               text=True)
            if r.returncode != 0:
                log.warning("native kernels off: compiling failed: %s", r.stderr.strip()[:500])
                return None
            os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gemrun_mm.argtypes = lib.gemrun_mm1.argtypes = [p, i64, i64, i32, ctypes.POINTER(Matrix), p, p, p, p, i32]
    lib.gemrun_mm1.restype = None
    lib.gemrun_q8_dequant.argtypes = [p, p, p, i64, i64, i64, p, i32]
    lib.gemrun_nibble_dequant.argtypes = [p, p, p, p, i64, i64, i64, p, i32]
    lib.gemrun_mm.restype = lib.gemrun_nibble_dequant.restype = lib.gemrun_q8_dequant.restype = None
    lib.gemrun_from_q4_0.argtypes = lib.gemrun_from_q8_0.argtypes = [p, i64, i64, p, p, i32]
    lib.gemrun_from_q4_0.restype = lib.gemrun_from_q8_0.restype = i64
    f32 = ctypes.c_float
    lib.gemrun_rms_norm.argtypes = [p, i64, i64, p, f32, f32, p]
    lib.gemrun_norm_rope.argtypes = [p, i64, i64, i64, p, f32, f32, p, p, i64, p]
    lib.gemrun_attend1.argtypes = [p, i64, i64, p, p, i32, i64, i64, i64, p, p, i64, f32, f32, p, p, i32]
    lib.gemrun_rms_norm.restype = lib.gemrun_norm_rope.restype = lib.gemrun_attend1.restype = None
    mats = ctypes.POINTER(Matrix)
    lib.gemrun_block_qkv.argtypes = [p, i64, i64, p, f32, f32, mats, i64, i64, i64, p, p, p, p, i64, p, p, p, p, p,
                                     i32]
    lib.gemrun_block_ffn.argtypes = [p, p, i64, i64, i64, i64, mats, mats, mats, p, p, p, f32, f32, p, p, p, p, p,
                                     p, p, p, i32]
    lib.gemrun_gelu_mul.argtypes = [p, p, i64, p, p]
    lib.gemrun_block_decode.argtypes = [ctypes.POINTER(BlockArgs), p, p, p, p, p, i32, i64, i64, i64, p, p, p, p, p,
                                        p, p, p, p, p, p, p, p, i32]
    lib.gemrun_block_decode.restype = None
    lib.gemrun_block_qkv.restype = lib.gemrun_block_ffn.restype = lib.gemrun_gelu_mul.restype = None
    lib.gemrun_flash_bf16.argtypes = [p, i64, i64, i64, p, p, i64, i64, f32, p, p, i32]
    lib.gemrun_flash_bf16.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:  # decided: no lock on the hot path (it is asked several times per layer and token)
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except OSError as e:
                log.warning("native kernels off: %s", e)
                _lib = None
            _tried = True  # after _lib: a thread that sees it without the lock sees the result
        return _lib


@functools.cache
def _pause_openmp():
    """libgomp's `omp_pause_resource_all` (the runtime torch loaded, which our kernels share: one library per
    soname), or None under another OpenMP runtime."""
    try:
        fn = ctypes.CDLL("libgomp.so.1").omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def release_openmp_workers() -> None:
    """Let the calling thread's OpenMP worker threads go (it gets new ones if it computes again). libgomp counts
    every thread that ever led a parallel region, with its pool; once that count exceeds the cores, every thread
    waiting at a barrier spins ~100 times and sleeps instead of spinning for milliseconds, so each of a forward's
    hundreds of regions pays futex wake-ups: a second thread that once ran parallel work (the loader, a prompt
    worker that encoded an image) made the engine thread's prefill 1.3-2x slower, with 100x the context switches.
    A thread done with its share of the compute calls this."""
    fn = _pause_openmp()
    if fn is not None:
        fn(1)  # omp_pause_soft; -1 (refused) inside a parallel region, where it is a no-op


def available() -> bool:
    return library() is not None


def supports(in_features: int) -> bool:
    """The kernels take K in whole chunks of 4 groups of 32."""
    return in_features % (4 * GROUP) == 0 and available()


@functools.cache
def lane_order(k: int) -> torch.Tensor:
    """order[p] = the row element stored at position p in the kernels' lane layout (see q4q8.c)."""
    g, order, c = k // GROUP, [], 0
    while c < g:
        cg = 16 if g - c >= 16 else 8 if g - c >= 8 else 4
        per = 16 // cg
        for r in range(cg // 2):
            for lane in range(16):
                first = (c + lane % cg) * GROUP + 4 * (r * per + lane // cg)
                order.extend(range(first, first + 4))
        c += cg
    return torch.tensor(order, dtype=torch.int32)


@functools.cache
def natural_order(k: int) -> torch.Tensor:
    """The inverse of `lane_order`: stored[..., natural_order(k)] gives the row in element order."""
    return torch.argsort(lane_order(k)).to(torch.long)


_scratch = threading.local()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


def _work(m: int, k: int) -> tuple[int, int, int]:
    """Pointers to this thread's scratch for quantized activations: xq (2m, k) int8, xd and xs (m, k/32) float32."""
    q, g = 2 * m * k, m * (k // GROUP) * 4
    need = q + 2 * g + 128
    buf = getattr(_scratch, "work", None)
    if buf is None or buf.numel() < need:
        buf = _scratch.work = torch.empty(max(need, 1 << 16), dtype=torch.uint8)
    p = buf.data_ptr()
    return p, p + (q + 63) // 64 * 64, p + (q + 63) // 64 * 64 + g


TILE = 2048  # weight rows dequantized at a time: the tile is reused while hot, the scratch stays small


def _dense(x: torch.Tensor, n: int, k: int, fill) -> torch.Tensor:
    """x . W^T with W dequantized to bf16, TILE rows at a time, in its stored (lane) order (x permuted to match).
    `fill(first_row, rows, out_ptr)` writes rows of W."""
    a = x.reshape(-1, k).to(torch.bfloat16)[:, lane_order(k).long()]
    y = torch.empty(a.shape[0], n, dtype=torch.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < TILE * k:
        buf = _scratch.buf = torch.empty(TILE * k, dtype=torch.bfloat16)
    for r in range(0, n, TILE):
        t = min(TILE, n - r)
        w = buf[:t * k].view(t, k)
        fill(r, t, w.data_ptr())
        y[:, r:r + t] = torch.nn.functional.linear(a, w)
    return y.reshape(*x.shape[:-1], n)


def mm(x: torch.Tensor, weights: list[Matrix] | Plan, levels: int = 2) -> torch.Tensor:
    """(..., K) activations x several packed weights sharing them -> float32 (..., N_0 + N_1 + ...): the
    activations are quantized once and one parallel region covers the rows of every matrix. `levels` 2: about 14
    bits per activation, each row's result the same in any batch (decode); 1: one int8 level per block of 32, as
    llama.cpp's Q8_0 activations, in tiles of many rows (long prompts)."""
    plan = weights if isinstance(weights, Plan) else Plan(weights)
    k = x.shape[-1]
    a = x.reshape(-1, k)
    if a.dtype != torch.float32 or not a.is_contiguous():
        a = a.to(torch.float32).contiguous()
    m = a.shape[0]
    y = torch.empty(m, plan.n, dtype=torch.float32)
    if levels == 2:
        library().gemrun_mm(a.data_ptr(), m, k, plan.count, plan.array, y.data_ptr(), *_work(m, k),
                            torch.get_num_threads())
    else:
        library().gemrun_mm1(a.data_ptr(), m, k, plan.count, plan.array, y.data_ptr(), *_work(m, k),
                             torch.get_num_threads())
    return y.view(*x.shape[:-1], plan.n)


def prefill_kernel(mins: torch.Tensor | None) -> str:
    """The kernel for many activation rows: PREFILL, where "auto" is "int8" for symmetric formats (Q4_0, Q8_0,
    Q5_0: llama.cpp's own arithmetic for them, ~1.7x the bf16 path on a CPU without AMX) and "bf16" for the rest."""
    if PREFILL != "auto":
        return PREFILL
    return "int8" if mins is None else "bf16"


def _mm(bits: int, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
        zero: int, high: torch.Tensor | None = None) -> torch.Tensor:
    n, k = q.shape[0], x.shape[-1]
    kernel = prefill_kernel(mins) if x.numel() // k >= DENSE_ROWS else "exact"
    if kernel == "bf16":
        lib, threads = library(), torch.get_num_threads()

        def fill(r: int, t: int, out: int) -> None:  # rows r..r+t as bf16 (4 and 5 bits: one nibble dequantizer)
            args = (q[r:].data_ptr(), scales[r:].data_ptr(), _ptr(None if mins is None else mins[r:]), zero, t, k,
                    out, threads)
            if bits == 8:
                lib.gemrun_q8_dequant(*args)
            else:
                lib.gemrun_nibble_dequant(args[0], _ptr(None if high is None else high[r:]), *args[1:])

        return _dense(x, n, k, fill)
    return mm(x, [matrix(bits, q, scales, mins, zero, high)], 1 if kernel == "int8" else 2)


def q4_mm(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
          zero: int = 0) -> torch.Tensor:
    """(..., K) activations x 4-bit weights (N, K/2 bytes, `pack_nibbles`), weight = q * scale + min with fp16
    scales and mins (N, K/32) -> float32 (..., N). Symmetric formats pass mins None: min = -zero * scale."""
    return _mm(4, x, nibbles, scales, mins, zero)


def q5_mm(x: torch.Tensor, nibbles: torch.Tensor, high: torch.Tensor, scales: torch.Tensor,
          mins: torch.Tensor | None, zero: int = 0) -> torch.Tensor:
    """(..., K) activations x 5-bit weights: q's low bits as `pack_nibbles` keeps them, the high bits as `pack_high`;
    weight = q * scale + min (mins None: min = -zero * scale) -> float32 (..., N)."""
    return _mm(5, x, nibbles, scales, mins, zero, high)


def pack_high(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..31 -> (N, K/8) bytes: bit 4 of each value in lane order, 8 values a byte (lowest bit first)."""
    n, k = q.shape
    bits = (q.to(torch.uint8)[:, lane_order(k).long()] >> 4).reshape(n, k // 8, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8).contiguous()


def q8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
          zero: int = 0) -> torch.Tensor:
    """(..., K) activations x 8-bit weights (N, K bytes, `q8_reorder`), weight = q * scale + min with fp16 scales
    and mins (N, K/32) -> float32 (..., N). Symmetric formats pass mins None: min = -zero * scale."""
    return _mm(8, x, q, scales, mins, zero)


def q8_reorder(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..255 -> the layout `q8_mm` reads: uint8 in lane order."""
    return q[:, lane_order(q.shape[1]).long()].to(torch.uint8).contiguous()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> (N, K/2) bytes in lane order: per 128 stored values, 64 bytes whose low nibbles hold
    the first 64 and high nibbles the next 64."""
    n, k = q.shape
    qs = q.to(torch.uint8)[:, lane_order(k).long()].reshape(n, k // 128, 2, 64)
    return (qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def from_gguf(raw: np.ndarray, kind: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_0 or Q8_0 matrix's bytes (n rows of k / 32 blocks) -> (nibbles (n, k/2) or q (n, k) in lane
    order, fp16 scales (n, k/32)) in one native pass: weight = (q - 8) * scale, or (q - 128) * scale. ValueError
    where a scale is not finite."""
    raw = np.ascontiguousarray(raw)
    q = torch.empty(n, k // 2 if kind == "Q4_0" else k, dtype=torch.uint8)
    scales = torch.empty(n, k // GROUP, dtype=torch.float16)
    fn = library().gemrun_from_q4_0 if kind == "Q4_0" else library().gemrun_from_q8_0
    if fn(raw.ctypes.data, n, k, q.data_ptr(), scales.data_ptr(), torch.get_num_threads()):
        raise ValueError("non-finite scales (NaN or infinity)")
    return q, scales


# The fused float32 operations of one decode step (ops.c). Callers check `fits` first; the PyTorch code they replace
# stays the reference (model/layers.py).


def fits(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors, and the kernels are there."""
    for t in tensors:  # a loop, not all(genexpr): asked several times per layer and token
        if t.dtype != torch.float32 or not t.is_cpu:
            return False
    return available()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, offset: float, eps: float) -> torch.Tensor:
    """x (..., n) / rms(x) * (offset + weight) in float32 (weight None: unscaled)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    w = None if weight is None else weight.contiguous()
    library().gemrun_rms_norm(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], _ptr(w), offset, eps,
                              out.data_ptr())
    return out


@functools.cache
def _bf16_dots() -> bool:
    return available() and "avx512_bf16" in _cpu_flags()


def flash_open_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `flash_open` takes these: one sequence, bfloat16 keys and values of one layout, at least 32 query
    rows per KV head (its tiles hold 64), head_dim a multiple of 32, the CPU's BF16 dot products, and a prefill
    kernel other than "exact" (which keeps float32 attention)."""
    b, h, t, d = q.shape
    kvh = k.shape[1]
    return (PREFILL != "exact" and b == 1 and k.shape[0] == 1 and h % kvh == 0 and h // kvh * t >= 32
            and d % 32 == 0 and k.shape[2] > 0 and k.dtype == v.dtype == torch.bfloat16 and k.stride() == v.stride()
            and k.stride(-1) == 1 and k.stride(-2) == d and q.dtype in (torch.float32, torch.bfloat16) and q.is_cpu
            and _bf16_dots())


def flash_open(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention where every query sees every key (a chunk over the cached part of a global layer): q (1, H, T, D)
    float32 or bfloat16, k and v (1, KV, S, D) bfloat16 views of one layout, read as stored -> (out (1, H, T, D),
    lse (1, H, T, 1) float32), with bfloat16 products (attn.c). None where `flash_open_fits` says no (or its scratch
    cannot be allocated)."""
    if not flash_open_fits(q, k, v):
        return None
    _, h, t, d = q.shape
    kvh = k.shape[1]
    qf = q.float().contiguous()
    out = torch.empty(1, h, t, d)
    lse = torch.empty(1, h, t, 1)
    if library().gemrun_flash_bf16(qf.data_ptr(), kvh, h // kvh * t, d, k.data_ptr(), v.data_ptr(), k.stride(1),
                                   k.shape[2], scale, out.data_ptr(), lse.data_ptr(), torch.get_num_threads()):
        return None  # no memory for its scratch: the float32 path
    return out.to(q.dtype), lse


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, offset: float, eps: float, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    """RMSNorm over head_dim then RoPE, for one new token: x (B, H, 1, D); cos, sin (1, D) or (B, 1, 1, D)."""
    b, h, _, d = x.shape
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    w = None if weight is None else weight.contiguous()
    library().gemrun_norm_rope(x.data_ptr(), b, h, d, _ptr(w), offset, eps, cos.data_ptr(), sin.data_ptr(),
                               0 if cos.numel() == d else d, out.data_ptr())
    return out


def attend1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
            kv_positions: torch.Tensor, window: int | None, scale: float, softcap: float | None
            ) -> torch.Tensor | None:
    """One new token's attention over a cache: q (1, H, 1, D) float32, k and v (1, KV, S, D) views of one layout in
    float32 or bfloat16 (read as they are stored), positions (1,), kv_positions (S,) (-1: empty slot) ->
    (1, H, 1, D); None when the shapes or types do not fit."""
    _, h, _, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    if (q.shape[0] != 1 or k.shape[0] != 1 or d % 16 or d > 512 or h % kvh or k.stride() != v.stride()
            or k.stride(-1) != 1 or k.stride(-2) != d or kv_positions.dtype != torch.int64
            or k.dtype not in (torch.float32, torch.bfloat16) or v.dtype != k.dtype or q.dtype != torch.float32):
        return None
    q, kv_positions, positions = q.contiguous(), kv_positions.contiguous(), positions.contiguous()
    out = torch.empty_like(q)
    threads = torch.get_num_threads()
    scratch = _floats(_attend_floats(h, s, d, threads))
    library().gemrun_attend1(q.data_ptr(), h, d, k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), kvh,
                             k.stride(1), s, kv_positions.data_ptr(), positions.data_ptr(), window or 0, scale,
                             softcap or 0.0, out.data_ptr(), scratch.data_ptr(), threads)
    return out


@functools.cache
def _tanh16() -> int | None:
    """The address of the vector tanh PyTorch's CPU gelu-tanh uses (Sleef's, 16 floats), when the fused blocks'
    gelu with it gives PyTorch's bits (checked once on values across the range, infinities and NaN); else None."""
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"))
        tanh = ctypes.cast(torch_cpu.Sleef_tanhf16_u10, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.randn(4064, generator=g) * 10.0 ** torch.randint(-6, 3, (4064,), generator=g),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 9.0, -9.0, 1e4, -1e4, float("inf"),
                                 float("-inf"), float("nan"), 3.4e38, -3.4e38, 0.5, -0.5, 1.0, -1.0, 2.0,
                                 -2.0, 1e-3, -1e-3, 10.0, -10.0, 0.1, -0.1, 3.0, -3.0, 7.0, -7.0, 20.0])])
    u = torch.randn(a.numel(), generator=g)
    got = torch.empty_like(a)
    library().gemrun_gelu_mul(a.data_ptr(), u.data_ptr(), a.numel(), tanh, got.data_ptr())
    want = torch.nn.functional.gelu(a, approximate="tanh") * u
    bits = [t.nan_to_num(0.0).view(torch.int32) for t in (got, want)]  # a NaN's payload may differ
    if not (torch.equal(got.isnan(), want.isnan()) and torch.equal(*bits)):
        log.info("fused decode blocks off: PyTorch's gelu-tanh is computed differently in this build")
        return None
    return tanh


def block_fits(x: torch.Tensor, intermediate: int, *norms: torch.Tensor) -> bool:
    """A Gemma 3 block's fused kernels apply: float32 CPU activations and norm weights, fewer rows than the dense
    path takes, an MLP width PyTorch's gelu covers with whole vectors (a multiple of its loop's 32), and its gelu
    reproduced (`_tanh16`)."""
    return (x.numel() // x.shape[-1] < DENSE_ROWS and intermediate % 32 == 0 and fits(x, *norms)
            and _tanh16() is not None)


def block_qkv(x: torch.Tensor, w_in: torch.Tensor, offset: float, eps: float, qkv: Plan, heads: int,
              kv_heads: int, d: int, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> torch.Tensor:
    """[q k v] (..., (heads + 2 kv_heads) d) = norm(x) . [Wq; Wk; Wv]^T with q's and k's heads QK-normed and
    rotated: the input norm, the three projections, and `norm_rope` of q and k in one call. x (..., E) float32;
    cos, sin (d,) for every row or one (d,) per row."""
    e = x.shape[-1]
    x = x.reshape(-1, e).contiguous()
    m = x.shape[0]
    cos, sin = cos.contiguous(), sin.contiguous()
    h = torch.empty(m, e)
    out = torch.empty(m, (heads + 2 * kv_heads) * d)
    library().gemrun_block_qkv(x.data_ptr(), m, e, w_in.data_ptr(), offset, eps, qkv.array, heads, kv_heads, d,
                               wq.data_ptr(), wk.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                               0 if cos.numel() == d else d, h.data_ptr(), out.data_ptr(), *_work(m, e),
                               torch.get_num_threads())
    return out


class BlockArgs(ctypes.Structure):
    """ops.c's `block_args`: a Gemma 3 block's fixed shapes and weights for `block_decode` (made once per block; it
    holds pointers, so the block remakes it when a weight's memory changes: `Block.decode_args`)."""

    _fields_ = [(n, ctypes.c_int64) for n in ("E", "H", "KV", "D", "I", "window")] + \
               [(n, ctypes.c_float) for n in ("offset", "eps", "scale", "softcap")] + \
               [(n, ctypes.c_void_p) for n in ("w_in", "wq", "wk", "w_post_attn", "w_pre_ff", "w_post_ff")] + \
               [(n, ctypes.POINTER(Matrix)) for n in ("qkv", "o", "gate_up", "down")] + [("tanh16", ctypes.c_void_p)]


def block_args(heads: int, kv_heads: int, d: int, window: int | None, offset: float, eps: float, scale: float,
               softcap: float | None, norms: tuple[torch.Tensor, ...], plans: tuple[Plan, ...]) -> BlockArgs:
    """The `BlockArgs` of norms (input, q, k, post-attention, pre-FFN, post-FFN weights) and plans (qkv, o,
    gate_up, down); the struct keeps the plans alive."""
    w_in, wq, wk, w_post_attn, w_pre_ff, w_post_ff = (w.data_ptr() for w in norms)
    qkv, o, gate_up, down = plans
    e, i = norms[0].shape[0], gate_up.matrices[0].n
    args = BlockArgs(e, heads, kv_heads, d, i, window or 0, offset, eps, scale, softcap or 0.0, w_in, wq, wk,
                     w_post_attn, w_pre_ff, w_post_ff, *(ctypes.cast(q.array, ctypes.POINTER(Matrix)) for q in plans),
                     _tanh16())
    args.plans = plans
    # block_decode's scratch in floats: h, qkv, y, then attend1's (heads per slot + a fixed part), t, g, act
    args.sizes = (e, (heads + 2 * kv_heads) * d, heads * d, 2 * e, 2 * i, i)
    args.widest = max(e, heads * d, i)
    return args


def block_decode(args: BlockArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, slot: int, used: int, kv_positions: torch.Tensor | None, positions: torch.Tensor
                 ) -> torch.Tensor:
    """A whole Gemma 3 block for one new token of one sequence in one call: `block_qkv`, the new k and v stored
    at `slot` of the cache k, v (1, KV, size, D) (float32 or bfloat16, contiguous) and its position at
    kv_positions[slot] (None: slot s holds position s), `attend1` over the first `used` slots, `block_ffn`.
    x (1, 1, E) float32 -> (1, 1, E)."""
    h = args.H
    threads = torch.get_num_threads()
    e, qkv, y, t, g, act = args.sizes
    att = _attend_floats(h, used, args.D, threads)
    buf = _floats(e + qkv + y + att + t + g + act + 7 * 16).data_ptr()
    ptrs = [buf]
    for n in (e, qkv, y, att, t, g):  # each part 64-byte aligned
        buf += (n + 15) // 16 * 64
        ptrs.append(buf)
    out = torch.empty(1, 1, e)
    library().gemrun_block_decode(ctypes.byref(args), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(),
                                  v.data_ptr(), k.dtype == torch.bfloat16, k.stride(1), slot, used,
                                  None if kv_positions is None else kv_positions.data_ptr(), positions.data_ptr(),
                                  *ptrs, out.data_ptr(), *_work(1, args.widest), threads)
    return out


def _attend_floats(heads: int, slots: int, d: int, threads: int) -> int:
    """Floats of attend1's scratch: every head's scores, then each thread's partial results per head."""
    return heads * slots + threads * heads * (d + 2)


def _floats(n: int) -> torch.Tensor:
    """This thread's float32 scratch of at least n floats, reused."""
    buf = getattr(_scratch, "floats", None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):
            buf = _scratch.floats = torch.empty(n, dtype=torch.float32)
    return buf


def block_ffn(x: torch.Tensor, y: torch.Tensor, o: Plan, gate_up: Plan, down: Plan, w_post_attn: torch.Tensor,
              w_pre_ff: torch.Tensor, w_post_ff: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """x + post_attn(o . y), then that + post_ff(down . (gelu_tanh(gate . h) * (up . h))) with h its pre_ff norm:
    the rest of a Gemma 3 block after attention, in one call. x (..., E), y (..., A) float32 -> (..., E)."""
    e, a, i = x.shape[-1], y.shape[-1], gate_up.matrices[0].n
    xs, ys = x.reshape(-1, e).contiguous(), y.reshape(-1, a).contiguous()
    m = xs.shape[0]
    t, g, act, out = torch.empty(2 * m * e), torch.empty(m * 2 * i), torch.empty(m * i), torch.empty(m, e)
    library().gemrun_block_ffn(xs.data_ptr(), ys.data_ptr(), m, e, a, i, o.array, gate_up.array, down.array,
                               w_post_attn.data_ptr(), w_pre_ff.data_ptr(), w_post_ff.data_ptr(), offset, eps,
                               _tanh16(), t.data_ptr(), g.data_ptr(), act.data_ptr(), out.data_ptr(),
                               *_work(m, max(e, a, i)), torch.get_num_threads())
    return out.view(x.shape)
