// Small fused float32 operations of one decode step (a few new tokens), for CPUs with AVX-512. At these sizes a
// PyTorch op costs more in dispatch than in arithmetic, and a decode step of the 270M runs ~100 RMSNorms; each
// function here replaces 5-10 of them. The arithmetic follows the PyTorch code it replaces (model/layers.py)
// operation by operation (no fused multiply-adds where PyTorch has none), except for the order of the sums.
//
// Built with q4q8.c into one library by gemrun/quant/native.py.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

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

static inline float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// Attention of one new token over a KV cache: q (heads, d); k, v: kv_heads x S slots of d floats, head h reading
// kv head h / (heads / kv_heads) at k + kv * kv_stride + slot * d. A slot takes part when its absolute position p
// is >= 0 (filled), <= the query's position and, with a window, > qpos - window; masked slots are never read
// (an empty sliding-window ring costs nothing). scores = q.k * scale (soft-capped: cap * tanh(s / cap)), softmax,
// out (heads, d) = sum p v. d a multiple of 16, at most 512; scratch: heads * S floats.
void gemrun_attend1(const float *q, int64_t heads, int64_t d, const float *k, const float *v, int64_t kv_heads,
                    int64_t kv_stride, int64_t S, const int64_t *kv_pos, const int64_t *q_pos, int64_t window,
                    float scale, float softcap, float *out, float *scratch, int nthreads) {
    const int64_t qp = *q_pos, group = heads / kv_heads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = q + h * d, *kh = k + (h / group) * kv_stride, *vh = v + (h / group) * kv_stride;
        float *sc = scratch + h * S, *o = out + h * d, top = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            int64_t p = kv_pos[s];
            if (p < 0 || p > qp || (window > 0 && p <= qp - window)) {
                sc[s] = -INFINITY;
                continue;
            }
            float x = dot(qh, kh + s * d, d) * scale;
            if (softcap > 0) x = softcap * tanhf(x / softcap);
            sc[s] = x;
            top = x > top ? x : top;
        }
        __m512 acc[32];  // d <= 512
        int64_t nv = d / 16;
        for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
        float total = 0.f;
        for (int64_t s = 0; s < S; s++) {
            if (sc[s] == -INFINITY) continue;
            float e = expf(sc[s] - top);
            total += e;
            __m512 ev = _mm512_set1_ps(e);
            for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_fmadd_ps(ev, _mm512_loadu_ps(vh + s * d + 16 * j), acc[j]);
        }
        float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
    }
}
