// Small fused float32 operations of one decode step (a few new tokens), for CPUs with AVX-512. At these sizes a
// PyTorch op costs more in dispatch than in arithmetic, and a decode step of the 270M runs ~100 RMSNorms; each
// function here replaces 5-10 of them. The arithmetic follows the PyTorch code it replaces (model/layers.py)
// operation by operation (no fused multiply-adds where PyTorch has none), except for the order of the sums.
//
// Built with q4q8.c into one library by gemrun/quant/native.py.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
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

// 16 cached values from k or v at element i: float32, or bfloat16 widened (its bits are a float32's top half)
static inline __m512 load16(const void *p, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p + i);
}

// exp(x) for 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (degree-6 polynomial, ~1 ulp); 0 below -87
static inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.f);
    __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

#define MAX_GROUP 16  // query heads per KV head the kernel takes
#define KEYS 32       // keys per block of the value pass (their rows stay in L1 while every head reads them)

// Attention of one new token over a KV cache: q (heads, d); k, v: kv_heads x S slots of d values (float32, or
// bfloat16 with kv_bf16), head h reading kv head h / (heads / kv_heads) at k + kv * kv_stride + slot * d. A slot
// takes part when its absolute position p is >= 0 (filled), <= the query's position and, with a window,
// > qpos - window; masked slots are never read (an empty sliding-window ring costs nothing). scores = q.k * scale
// (soft-capped: cap * tanh(s / cap)), softmax, out (heads, d) = sum p v.
//
// Decoding at depth is a read of the whole cache, so it is read once: the threads split the slots (not the heads),
// each key row serves every query head of its group at once (independent accumulators), exponentials are taken 16
// at a time, and values are summed a block of KEYS rows at a time with each head's sum in registers. The threads'
// partial results (max score, sum of exponentials, weighted values) are merged at the end by their log-sum-exp.
// d a multiple of 16, at most 512; heads / kv_heads at most MAX_GROUP; scratch: heads * S + nthreads * heads *
// (d + 2) floats.
void gemrun_attend1(const float *q, int64_t heads, int64_t d, const void *k, const void *v, int kv_bf16,
                    int64_t kv_heads, int64_t kv_stride, int64_t S, const int64_t *kv_pos, const int64_t *q_pos,
                    int64_t window, float scale, float softcap, float *out, float *scratch, int nthreads) {
    const int64_t qp = *q_pos, group = heads / kv_heads, nv = d / 16, width = d + 2;
    float *partial = scratch + heads * S;  // thread t, head h: top, total, acc[d] at (t * heads + h) * width
    int used = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
#pragma omp single
        used = T;
        int64_t s0 = S * t / T, s1 = S * (t + 1) / T;
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            int64_t h0 = kh * group, base = kh * kv_stride;
            float *sc = scratch + h0 * S;  // head h0 + g: sc[g * S + s]
            float top[MAX_GROUP];
            for (int64_t g = 0; g < group; g++) top[g] = -INFINITY;
            for (int64_t s = s0; s < s1; s++) {
                int64_t p = kv_pos[s];
                if (p < 0 || p > qp || (window > 0 && p <= qp - window)) {
                    for (int64_t g = 0; g < group; g++) sc[g * S + s] = -INFINITY;
                    continue;
                }
                __m512 acc[MAX_GROUP];
                for (int64_t g = 0; g < group; g++) acc[g] = _mm512_setzero_ps();
                for (int64_t i = 0; i < d; i += 16) {
                    __m512 kv = load16(k, kv_bf16, base + s * d + i);
                    for (int64_t g = 0; g < group; g++)
                        acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (h0 + g) * d + i), kv, acc[g]);
                }
                for (int64_t g = 0; g < group; g++) {
                    float x = _mm512_reduce_add_ps(acc[g]) * scale;
                    if (softcap > 0) x = softcap * tanhf(x / softcap);
                    sc[g * S + s] = x;
                    top[g] = x > top[g] ? x : top[g];
                }
            }
            for (int64_t g = 0; g < group; g++) {  // scores -> exp(score - top), and their sum
                float *row = sc + g * S, *part = partial + (t * heads + h0 + g) * width;
                __m512 m = _mm512_set1_ps(top[g]), sum = _mm512_setzero_ps();
                int64_t s = s0;
                for (; s + 16 <= s1 && top[g] > -INFINITY; s += 16) {
                    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + s), m));
                    _mm512_storeu_ps(row + s, e);
                    sum = _mm512_add_ps(sum, e);
                }
                float total = _mm512_reduce_add_ps(sum);
                for (; s < s1; s++) {
                    row[s] = top[g] > -INFINITY && row[s] > -INFINITY ? expf(row[s] - top[g]) : 0.f;
                    total += row[s];
                }
                part[0] = top[g], part[1] = total;
                for (int64_t j = 0; j < d; j++) part[2 + j] = 0.f;
            }
            for (int64_t b0 = s0; b0 < s1; b0 += KEYS) {  // values: a block of rows, every head in turn
                int64_t b1 = b0 + KEYS < s1 ? b0 + KEYS : s1;
                for (int64_t g = 0; g < group; g++) {
                    const float *e = sc + g * S;
                    float *part = partial + (t * heads + h0 + g) * width + 2;
                    __m512 acc[32];  // d <= 512
                    for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_loadu_ps(part + 16 * j);
                    for (int64_t s = b0; s < b1; s++) {
                        if (e[s] == 0.f) continue;
                        __m512 w = _mm512_set1_ps(e[s]);
                        for (int64_t j = 0; j < nv; j++)
                            acc[j] = _mm512_fmadd_ps(w, load16(v, kv_bf16, base + s * d + 16 * j), acc[j]);
                    }
                    for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(part + 16 * j, acc[j]);
                }
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
