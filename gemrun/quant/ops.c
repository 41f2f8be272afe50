// Small fused float32 operations of one decode step (a few new tokens), for CPUs with AVX-512. At these sizes a
// PyTorch op costs more in dispatch than in arithmetic, and a decode step of the 270M runs ~100 RMSNorms; each
// function here replaces 5-10 of them. The arithmetic follows the PyTorch code it replaces (model/layers.py)
// operation by operation (no fused multiply-adds where PyTorch has none), except for the order of the sums.
//
// Built with q4q8.c and attn.c into one library by gemrun/quant/native.py (vec.h: helpers shared with attn.c).

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define EXACT __attribute__((optimize("fp-contract=off")))

static inline float sum_squares(const float *x, int64_t n) {
    __m512 a = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        a = _mm512_add_ps(a, _mm512_mul_ps(v, v));
    }
    float s = _mm512_reduce_add_ps(a);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

// y = x * rsqrt(mean(x^2) + eps) * (offset + w) for one vector of n (w NULL: no weight)
static inline EXACT void norm_vec(const float *x, int64_t n, const float *w, float offset, float eps, float *y) {
    float r = 1.f / sqrtf(sum_squares(x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) {
        float t = x[i] * r;
        y[i] = w ? t * (offset + w[i]) : t;
    }
}

// RMSNorm of `rows` vectors of n: Gemma 3 scales by (1 + w) (offset 1), Gemma 4 by w (offset 0) or not at all.
EXACT void gemrun_rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float offset, float eps,
                           float *out) {
    for (int64_t r = 0; r < rows; r++) norm_vec(x + r * n, n, w, offset, eps, out + r * n);
}

// Per head: RMSNorm over d (QK-norm), then RoPE in the half-split layout: out = y * cos + rotate_half(y) * sin,
// rotate_half(y) = (-y[d/2:], y[:d/2]). x (rows, heads, d); cos, sin (rows, d), or (1, d) for every row.
EXACT void gemrun_norm_rope(const float *x, int64_t rows, int64_t heads, int64_t d, const float *w, float offset,
                            float eps, const float *cos, const float *sin, int64_t cs_stride, float *out) {
    float y[d];
    int64_t h2 = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * cs_stride, *s = sin + r * cs_stride;
        for (int64_t h = 0; h < heads; h++) {
            const float *v = x + (r * heads + h) * d;
            float *o = out + (r * heads + h) * d;
            norm_vec(v, d, w, offset, eps, y);
            for (int64_t i = 0; i < h2; i++) {
                float a = y[i] * c[i], b = -y[i + h2] * s[i];
                o[i] = a + b;
                float e = y[i + h2] * c[i + h2], f = y[i] * s[i + h2];
                o[i + h2] = e + f;
            }
        }
    }
}

// 16 cached values from k or v at element i: float32, or bfloat16 widened (its bits are a float32's top half)
static inline __m512 load16(const void *p, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p + i);
}

#define KEYS 32  // cache rows per block: read from memory once (widened to float32 once), then used by every head
#define ALWAYS static inline __attribute__((always_inline))

// Rows b0..b1 of one KV head (d values each at src + (base + s * d)) as float32: the rows themselves for a float32
// cache, else widened into buf (KEYS * d floats). Returns the address of row b0.
static inline const float *rows_f32(const void *src, int bf16, int64_t base, int64_t b0, int64_t b1, int64_t d,
                                    float *buf) {
    if (!bf16) return (const float *)src + base + b0 * d;
    for (int64_t i = 0; i < (b1 - b0) * d; i += 16) _mm512_storeu_ps(buf + i, load16(src, bf16, base + b0 * d + i));
    return buf;
}

// The scores of G query heads (q: G rows of d) against nb key rows: sc[g * S + s] = q_g . row_s * scale (soft-capped),
// -inf where mark[s] is -inf (a masked slot). Each row is loaded once for the G heads; U = 4 / G independent sums per
// head keep the multiply-adds from waiting on each other. G is a constant at every call (the loops unroll into
// registers).
ALWAYS void block_scores(const int G, const float *q, int64_t d, const float *rows, int64_t nb, float *sc, int64_t S,
                         float scale, float softcap) {
    const int U = G >= 4 ? 1 : 4 / G;
    for (int64_t s = 0; s < nb; s++) {
        if (sc[s] == -INFINITY) {
            for (int g = 1; g < G; g++) sc[g * S + s] = -INFINITY;
            continue;
        }
        __m512 acc[G][U];
        for (int g = 0; g < G; g++)
            for (int u = 0; u < U; u++) acc[g][u] = _mm512_setzero_ps();
        const float *row = rows + s * d;
        int64_t i = 0;
        for (; i + 16 * U <= d; i += 16 * U)
            for (int u = 0; u < U; u++) {
                __m512 kv = _mm512_loadu_ps(row + i + 16 * u);
                for (int g = 0; g < G; g++)
                    acc[g][u] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + i + 16 * u), kv, acc[g][u]);
            }
        for (; i < d; i += 16) {
            __m512 kv = _mm512_loadu_ps(row + i);
            for (int g = 0; g < G; g++) acc[g][0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + i), kv, acc[g][0]);
        }
        for (int g = 0; g < G; g++) {
            for (int u = 1; u < U; u++) acc[g][0] = _mm512_add_ps(acc[g][0], acc[g][u]);
            float x = _mm512_reduce_add_ps(acc[g][0]) * scale;
            if (softcap > 0) x = softcap * tanhf(x / softcap);
            sc[g * S + s] = x;
        }
    }
}

// acc_g (d floats each, `width` apart) += sum over nb rows of e[g * S + s] * row_s, for G heads: a tile of J vectors
// of every head's sums stays in registers while the rows go by (J * G <= 16 accumulators). Rows with e == 0 in the
// first head (masked slots) are skipped.
ALWAYS void block_values(const int G, const float *e, int64_t S, const float *rows, int64_t nb, int64_t d,
                         float *acc_out, int64_t width) {
    const int J = G >= 16 ? 1 : 16 / G;
    int64_t nv = d / 16, j0 = 0;
    for (; j0 + J <= nv; j0 += J) {
        __m512 acc[G][J];
        for (int g = 0; g < G; g++)
            for (int j = 0; j < J; j++) acc[g][j] = _mm512_loadu_ps(acc_out + g * width + 16 * (j0 + j));
        for (int64_t s = 0; s < nb; s++) {
            if (e[s] == 0.f) continue;
            for (int j = 0; j < J; j++) {
                __m512 vv = _mm512_loadu_ps(rows + s * d + 16 * (j0 + j));
                for (int g = 0; g < G; g++) acc[g][j] = _mm512_fmadd_ps(_mm512_set1_ps(e[g * S + s]), vv, acc[g][j]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int j = 0; j < J; j++) _mm512_storeu_ps(acc_out + g * width + 16 * (j0 + j), acc[g][j]);
    }
    for (; j0 < nv; j0++)  // the vectors left over (d / 16 not a multiple of J)
        for (int g = 0; g < G; g++) {
            __m512 a = _mm512_loadu_ps(acc_out + g * width + 16 * j0);
            for (int64_t s = 0; s < nb; s++)
                a = _mm512_fmadd_ps(_mm512_set1_ps(e[g * S + s]), _mm512_loadu_ps(rows + s * d + 16 * j0), a);
            _mm512_storeu_ps(acc_out + g * width + 16 * j0, a);
        }
}

// The G-specialized kernels for one KV head's group of heads (the sizes Gemma uses get their own unrolled copies;
// any other group goes one head at a time).
static void group_scores(int64_t group, const float *q, int64_t d, const float *rows, int64_t nb, float *sc,
                         int64_t S, float scale, float softcap) {
    switch (group) {
        case 1: block_scores(1, q, d, rows, nb, sc, S, scale, softcap); return;
        case 2: block_scores(2, q, d, rows, nb, sc, S, scale, softcap); return;
        case 4: block_scores(4, q, d, rows, nb, sc, S, scale, softcap); return;
        case 8: block_scores(8, q, d, rows, nb, sc, S, scale, softcap); return;
    }
    for (int64_t g = 1; g < group; g++)  // every head's row gets the first one's marks of masked slots
        for (int64_t s = 0; s < nb; s++) sc[g * S + s] = sc[s];
    for (int64_t g = 0; g < group; g++) block_scores(1, q + g * d, d, rows, nb, sc + g * S, S, scale, softcap);
}

static void group_values(int64_t group, const float *e, int64_t S, const float *rows, int64_t nb, int64_t d,
                         float *acc, int64_t width) {
    switch (group) {
        case 1: block_values(1, e, S, rows, nb, d, acc, width); return;
        case 2: block_values(2, e, S, rows, nb, d, acc, width); return;
        case 4: block_values(4, e, S, rows, nb, d, acc, width); return;
        case 8: block_values(8, e, S, rows, nb, d, acc, width); return;
    }
    for (int64_t g = 0; g < group; g++) block_values(1, e + g * S, S, rows, nb, d, acc + g * width, width);
}

// Attention of one new token over a KV cache: q (heads, d); k, v: kv_heads x S slots of d values (float32, or
// bfloat16 with kv_bf16), head h reading kv head h / (heads / kv_heads) at k + kv * kv_stride + slot * d. A slot
// takes part when its absolute position p is >= 0 (filled), <= the query's position and, with a window,
// > qpos - window; masked slots are never read (an empty sliding-window ring costs nothing). scores = q.k * scale
// (soft-capped: cap * tanh(s / cap)), softmax, out (heads, d) = sum p v.
//
// Decoding at depth is a read of the whole cache, so it is read once: the threads split the slots (not the heads)
// and take them KEYS rows at a time, which every query head of the group uses while they are in L1 (each row
// loaded once for all the heads, the heads' sums in registers); the exponentials are taken 16 at a time. The
// threads' partial results (max score, sum of exponentials, weighted values) are merged at the end by their
// log-sum-exp. d a multiple of 16, at most 512; scratch: heads * S + nthreads * heads * (d + 2) floats.
// The body, run by every thread of the team (kv_pos NULL: slot s holds position s).
static void attend1_team(const float *q, int64_t heads, int64_t d, const void *k, const void *v, int kv_bf16,
                         int64_t kv_heads, int64_t kv_stride, int64_t S, const int64_t *kv_pos, const int64_t *q_pos,
                         int64_t window, float scale, float softcap, float *out, float *scratch) {
    const int64_t qp = *q_pos, group = heads / kv_heads, nv = d / 16, width = d + 2;
    float *partial = scratch + heads * S;  // thread t, head h: top, total, acc[d] at (t * heads + h) * width
    const int t = omp_get_thread_num(), T = omp_get_num_threads(), used = T;
    {
        int64_t s0 = S * t / T, s1 = S * (t + 1) / T;
        float buf[KEYS * d];
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            int64_t h0 = kh * group, base = kh * kv_stride;
            float *sc = scratch + h0 * S;  // head h0 + g: sc[g * S + s]
            for (int64_t b0 = s0; b0 < s1; b0 += KEYS) {  // scores
                int64_t b1 = b0 + KEYS < s1 ? b0 + KEYS : s1;
                int any = 0;
                for (int64_t s = b0; s < b1; s++) {
                    int64_t p = kv_pos ? kv_pos[s] : s;
                    int seen = p >= 0 && p <= qp && !(window > 0 && p <= qp - window);
                    sc[s] = seen ? 0.f : -INFINITY;  // the first head's row marks the visible slots for all
                    any |= seen;
                }
                if (!any) {
                    for (int64_t g = 1; g < group; g++)
                        for (int64_t s = b0; s < b1; s++) sc[g * S + s] = -INFINITY;
                    continue;
                }
                const float *rows = rows_f32(k, kv_bf16, base, b0, b1, d, buf);
                group_scores(group, q + h0 * d, d, rows, b1 - b0, sc + b0, S, scale, softcap);
            }
            for (int64_t g = 0; g < group; g++) {  // scores -> exp(score - top), and their sum
                float *row = sc + g * S, *part = partial + (t * heads + h0 + g) * width;
                float top = -INFINITY;
                for (int64_t s = s0; s < s1; s++) top = row[s] > top ? row[s] : top;
                __m512 m = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
                int64_t s = s0;
                for (; s + 16 <= s1 && top > -INFINITY; s += 16) {
                    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + s), m));
                    _mm512_storeu_ps(row + s, e);
                    sum = _mm512_add_ps(sum, e);
                }
                float total = _mm512_reduce_add_ps(sum);
                for (; s < s1; s++) {
                    row[s] = top > -INFINITY && row[s] > -INFINITY ? expf(row[s] - top) : 0.f;
                    total += row[s];
                }
                part[0] = top, part[1] = total;
                for (int64_t j = 0; j < d; j++) part[2 + j] = 0.f;
            }
            for (int64_t b0 = s0; b0 < s1; b0 += KEYS) {  // values
                int64_t b1 = b0 + KEYS < s1 ? b0 + KEYS : s1;
                int any = 0;
                for (int64_t s = b0; s < b1 && !any; s++) any = sc[s] != 0.f;
                if (!any) continue;
                const float *rows = rows_f32(v, kv_bf16, base, b0, b1, d, buf);
                group_values(group, sc + b0, S, rows, b1 - b0, d, partial + (t * heads + h0) * width + 2, width);
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; h++) {
            float m = -INFINITY, total = 0.f;
            for (int u = 0; u < used; u++) m = fmaxf(m, partial[(u * heads + h) * width]);
            __m512 acc[32];  // d <= 512
            for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
            for (int u = 0; u < used && m > -INFINITY; u++) {
                const float *part = partial + (u * heads + h) * width;
                if (part[0] == -INFINITY) continue;
                float w = expf(part[0] - m);
                total += w * part[1];
                for (int64_t j = 0; j < nv; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(part + 2 + 16 * j), acc[j]);
            }
            float inv = total > 0.f ? 1.f / total : 0.f;
            for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(out + h * d + 16 * j, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
        }
    }
}

void gemrun_attend1(const float *q, int64_t heads, int64_t d, const void *k, const void *v, int kv_bf16,
                    int64_t kv_heads, int64_t kv_stride, int64_t S, const int64_t *kv_pos, const int64_t *q_pos,
                    int64_t window, float scale, float softcap, float *out, float *scratch, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    attend1_team(q, heads, d, k, v, kv_bf16, kv_heads, kv_stride, S, kv_pos, q_pos, window, scale, softcap, out,
                 scratch);
}

// ---- A Gemma 3 block's decode step around its attention, for M rows (new tokens or sequences decoded together),
// in one parallel region each instead of ~10 PyTorch operations and 3 kernel calls. The same arithmetic as the
// unfused path: the norms above, gemrun_mm's products (q4q8.c), PyTorch's gelu-tanh with its own vector tanh
// (Sleef's, passed in as `tanh16`), float32 adds.

typedef struct matrix matrix;  // q4q8.c
void gemrun_mm_team(const float *x, int64_t M, int64_t K, int count, const matrix *ws, float *y, int8_t *xq,
                    float *xd, float *xs);
typedef __m512 (*vec_fn)(__m512);

// The threads split the rows of an (M, n) norm: out = norm(x); with `add`, x = norm(x) in place and then
// out = add + x (out may be add). Row strides n.
static inline EXACT void norm_rows(float *x, int64_t M, int64_t n, const float *w, float offset, float eps,
                                   const float *add, float *out) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *r = x + m * n;
        norm_vec(r, n, w, offset, eps, add ? r : out + m * n);
        if (add)
            for (int64_t i = 0; i < n; i++) out[m * n + i] = add[m * n + i] + r[i];
    }
}

// out = gelu_tanh(a) * u for 16 floats, as PyTorch computes 0.5 * a * (1 + tanh(beta * (a + kappa * a^3)))
// (its build contracts a + kappa * a^3 into one fused multiply-add; `gemrun_gelu_mul` lets native.py check that).
static inline void gelu_mul16(const float *a_, const float *u, vec_fn tanh16, float *out) {
    const __m512 beta = _mm512_set1_ps((float)(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm512_set1_ps(0.044715f);
    __m512 a = _mm512_loadu_ps(a_);
    __m512 inner = _mm512_mul_ps(beta, _mm512_fmadd_ps(kappa, _mm512_mul_ps(_mm512_mul_ps(a, a), a), a));
    __m512 gelu = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), a),
                                _mm512_add_ps(_mm512_set1_ps(1.f), tanh16(inner)));
    _mm512_storeu_ps(out, _mm512_mul_ps(gelu, _mm512_loadu_ps(u)));
}

// gelu_mul16 over n floats (a multiple of 16).
void gemrun_gelu_mul(const float *a, const float *u, int64_t n, vec_fn tanh16, float *out) {
    for (int64_t i = 0; i < n; i += 16) gelu_mul16(a + i, u + i, tanh16, out + i);
}

// [q k v] (M, (H + 2 KV) D) = norm(x) . [Wq; Wk; Wv]^T, then q's and k's heads QK-normed and rotated in place.
// x (M, E); h (M, E) scratch; cos, sin (1, D) or (M, D) (cs_stride 0 or D).
static inline EXACT void qkv_team(const float *x, int64_t M, int64_t E, const float *w_in, float offset, float eps,
                                  const matrix *qkv, int64_t H, int64_t KV, int64_t D, const float *wq,
                                  const float *wk, const float *cos, const float *sin, int64_t cs_stride, float *h,
                                  float *out, int8_t *xq, float *xd, float *xs) {
    const int64_t width = (H + 2 * KV) * D;
    norm_rows((float *)x, M, E, w_in, offset, eps, NULL, h);  // without `add` x is only read
    gemrun_mm_team(h, M, E, 3, qkv, out, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < M * (H + KV); j++) {  // one head of one row: q heads, then k heads
        int64_t m = j / (H + KV), head = j % (H + KV);
        float *v = out + m * width + head * D;
        gemrun_norm_rope(v, 1, 1, D, head < H ? wq : wk, offset, eps, cos + m * cs_stride, sin + m * cs_stride, 0,
                         v);
    }
}

EXACT void gemrun_block_qkv(const float *x, int64_t M, int64_t E, const float *w_in, float offset, float eps,
                            const matrix *qkv, int64_t H, int64_t KV, int64_t D, const float *wq, const float *wk,
                            const float *cos, const float *sin, int64_t cs_stride, float *h, float *out, int8_t *xq,
                            float *xd, float *xs, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    qkv_team(x, M, E, w_in, offset, eps, qkv, H, KV, D, wq, wk, cos, sin, cs_stride, h, out, xq, xd, xs);
}

// out (M, E) = x + post_attn(o . y); then out += post_ff(down . (gelu_tanh(gate . h) * (up . h))), h = pre_ff(out).
// y (M, A) the attention's output; o, gate_up (2 matrices), down packed; I the MLP's width (a multiple of 32: the
// vector loop of PyTorch's gelu then covers every element). Scratch: t (M, E) twice, g (M, 2I), act (M, I).
static inline EXACT void ffn_team(const float *x, const float *y, int64_t M, int64_t E, int64_t A, int64_t I,
                                  const matrix *o, const matrix *gate_up, const matrix *down,
                                  const float *w_post_attn, const float *w_pre_ff, const float *w_post_ff,
                                  float offset, float eps, vec_fn tanh16, float *t, float *g, float *act, float *out,
                                  int8_t *xq, float *xd, float *xs) {
    float *h = t + M * E;
    gemrun_mm_team(y, M, A, 1, o, t, xq, xd, xs);
    norm_rows(t, M, E, w_post_attn, offset, eps, x, out);
    norm_rows(out, M, E, w_pre_ff, offset, eps, NULL, h);
    gemrun_mm_team(h, M, E, 2, gate_up, g, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < M * I; j += 16) {
        int64_t m = j / I, i = j % I;
        gelu_mul16(g + m * 2 * I + i, g + m * 2 * I + I + i, tanh16, act + j);
    }
    gemrun_mm_team(act, M, I, 1, down, t, xq, xd, xs);
    norm_rows(t, M, E, w_post_ff, offset, eps, out, out);  // out = out + post_ff(t), row by row
}

EXACT void gemrun_block_ffn(const float *x, const float *y, int64_t M, int64_t E, int64_t A, int64_t I, const matrix *o,
                            const matrix *gate_up, const matrix *down, const float *w_post_attn,
                            const float *w_pre_ff, const float *w_post_ff, float offset, float eps, vec_fn tanh16,
                            float *t, float *g, float *act, float *out, int8_t *xq, float *xd, float *xs,
                            int nthreads) {
#pragma omp parallel num_threads(nthreads)
    ffn_team(x, y, M, E, A, I, o, gate_up, down, w_post_attn, w_pre_ff, w_post_ff, offset, eps, tanh16, t, g, act,
             out, xq, xd, xs);
}

// A whole Gemma 3 block for one new token of one sequence, in one parallel region: block_qkv's arithmetic, the
// new k and v stored in the cache (float32, or bfloat16 with kv_bf16) at `slot`, and its position in kv_pos where
// the cache keeps positions (a sliding-window ring; NULL: slot s holds position s), attend1 over the first S slots,
// then block_ffn's. The block's fixed shapes and weights come in `w` (made once, see native.py's BlockArgs);
// scratch: h (E), qkv ((H + 2 KV) D), y (H D), att (attend1's), t (2 E), g (2 I), act (I).
typedef struct {
    int64_t E, H, KV, D, I, window;
    float offset, eps, scale, softcap;
    const float *w_in, *wq, *wk, *w_post_attn, *w_pre_ff, *w_post_ff;
    const matrix *qkv, *o, *gate_up, *down;
    vec_fn tanh16;
} block_args;

EXACT void gemrun_block_decode(const block_args *w, const float *x, const float *cos, const float *sin, void *k,
                               void *v, int kv_bf16, int64_t kv_stride, int64_t slot, int64_t S, int64_t *kv_pos,
                               const int64_t *q_pos, float *h, float *qkv, float *y, float *att, float *t, float *g,
                               float *act, float *out, int8_t *xq, float *xd, float *xs, int nthreads) {
    const int64_t H = w->H, KV = w->KV, D = w->D;
#pragma omp parallel num_threads(nthreads)
    {
        qkv_team(x, 1, w->E, w->w_in, w->offset, w->eps, w->qkv, H, KV, D, w->wq, w->wk, cos, sin, 0, h, qkv, xq, xd,
                 xs);
#pragma omp for schedule(static)
        for (int64_t kh = 0; kh < KV; kh++) {  // the new k and v into their slot
            const float *nk = qkv + (H + kh) * D, *nv = qkv + (H + KV + kh) * D;
            int64_t at = kh * kv_stride + slot * D;
            if (kv_bf16)
                for (int64_t j = 0; j < D; j++)
                    ((uint16_t *)k)[at + j] = bf16_bits(nk[j]), ((uint16_t *)v)[at + j] = bf16_bits(nv[j]);
            else
                memcpy((float *)k + at, nk, D * 4), memcpy((float *)v + at, nv, D * 4);
            if (kh == 0 && kv_pos) kv_pos[slot] = *q_pos;
        }
        attend1_team(qkv, H, D, k, v, kv_bf16, KV, kv_stride, S, kv_pos, q_pos, w->window, w->scale, w->softcap, y,
                     att);
        ffn_team(x, y, 1, w->E, H * D, w->I, w->o, w->gate_up, w->down, w->w_post_attn, w->w_pre_ff, w->w_post_ff,
                 w->offset, w->eps, w->tanh16, t, g, act, out, xq, xd, xs);
    }
}
