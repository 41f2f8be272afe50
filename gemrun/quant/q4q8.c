// Weight-only low-bit matrix products for x86-64 CPUs with AVX-512 VNNI.
//
// y (M, N) = x (M, K) . W^T with W stored packed. The activations are quantized in blocks of 32 to two int8 levels
// (x ~ d * (hi + lo / 128): about 14 bits, finer than bf16) and each block's dot product runs on integers
// (vpdpbusd), then is scaled and summed in fp32. Every (m, n) output is computed by the same instructions whatever
// M is, so a row's result does not depend on the batch it is in.
//
// Layout ("lanes"): K is cut into chunks of cg = 16, 8 or 4 groups of 32. A chunk is cg/2 vectors of 64 values;
// in vector r, int32 lane l (bytes 4l..4l+3) holds elements e = 4 * (r * (16 / cg) + l / cg) + j, j = 0..3, of
// group l % cg. So every vpdpbusd adds into each lane products of one group only, and a chunk needs one scale
// multiply, not one per group.
//
// q4: weight = q * s + m, q in 0..15, fp16 s and m per group. Nibbles of vector pairs (r, r+1): 64 bytes whose low
//     halves are vector r and high halves vector r+1.
// q8: weight = q * s + m, q in 0..255 in vector order, fp16 s and m per group.
// Symmetric formats (Q4_0, Q8_0, Q5_0: m = -z s with one integer z for the whole matrix) pass mins = NULL and z:
// the weights then cost the file's own bytes (no fp16 minimum beside every scale) and are still exact.
//
// Built by gemrun/quant/native.py with gcc; called through ctypes. The index maps are made in native.py.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 32
#define MT 4  // activation rows per pass over a weight row

static inline int chunk_groups(int64_t G, int64_t c) {
    int64_t left = G - c;
    return left >= 16 ? 16 : left >= 8 ? 8 : 4;
}

// x (M, K) fp32 -> hi levels xq[m*K ..], lo levels xq[M*K + m*K ..] in lane order; d (M, K/32) = block scale / 128
// (the integer dots come out scaled by 128); s (M, K/32) = block sums of the quantized values, unscaled by 128.
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *d, float *s, int nthreads) {
    int64_t G = K / QK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        int8_t *hi = xq + m * K, *lo = xq + M * K + m * K;
        for (int64_t c = 0; c < G; c += chunk_groups(G, c)) {
            int cg = chunk_groups(G, c);
            for (int gg = 0; gg < cg; gg++) {
                int64_t g = c + gg;
                const float *v = x + m * K + g * QK;
                float amax = 0.f;
                for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
                float dd = amax / 127.f, id = dd > 0.f ? 1.f / dd : 0.f, sum = 0.f;
                for (int e = 0; e < QK; e++) {
                    float t = v[e] * id;
                    int h = (int)nearbyintf(t);
                    h = h > 127 ? 127 : h < -127 ? -127 : h;
                    int l = (int)nearbyintf((t - (float)h) * 128.f);
                    l = l > 127 ? 127 : l < -127 ? -127 : l;
                    sum += (float)h + (float)l * (1.f / 128.f);
                    // element e of group gg -> vector r, lane l, byte j
                    int j = e % 4, slot = e / 4, per = 16 / cg;
                    int r = slot / per, lane = (slot % per) * cg + gg;
                    int64_t at = c * QK + r * 64 + lane * 4 + j;
                    hi[at] = (int8_t)h, lo[at] = (int8_t)l;
                }
                d[m * G + g] = dd / 128.f;
                s[m * G + g] = dd * sum;
            }
        }
    }
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// lane -> its group within a chunk of cg groups
static inline __m512i lane_groups(int cg) {
    return _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(cg - 1));
}

// One weight row against `mt` activation rows (mt constant after inlining): w4 nibbles or w8 bytes, ws/wm the
// row's fp16 scales and mins per group (wm NULL: m = -zero * s).
static inline __attribute__((always_inline)) void dot_row(const uint8_t *w4, const uint8_t *w8, const uint16_t *ws,
                                                          const uint16_t *wm, float zero, int64_t G, int64_t K,
                                                          const int8_t *xq, const int8_t *xl, const float *xd,
                                                          const float *xs, const int mt, float *out) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    __m512 acc[MT], accm[MT];
    for (int i = 0; i < mt; i++) acc[i] = accm[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < G; c += chunk_groups(G, c)) {
        int cg = chunk_groups(G, c);
        __mmask16 k = (__mmask16)((1u << cg) - 1);
        __m512i dh[MT], dl[MT];
        for (int i = 0; i < mt; i++) dh[i] = dl[i] = _mm512_setzero_si512();
        const int64_t base = c * QK;
        for (int r = 0; r < cg / 2; r += 2) {
            __m512i wa, wb;
            if (w4) {
                __m512i v = _mm512_loadu_si512((const void *)(w4 + base / 2 + r * 32));
                wa = _mm512_and_si512(v, lo4);
                wb = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
            } else {
                wa = _mm512_loadu_si512((const void *)(w8 + base + r * 64));
                wb = _mm512_loadu_si512((const void *)(w8 + base + r * 64 + 64));
            }
            for (int i = 0; i < mt; i++) {
                const int8_t *h = xq + i * K + base + r * 64, *l = xl + i * K + base + r * 64;
                dh[i] = _mm512_dpbusd_epi32(dh[i], wa, _mm512_loadu_si512((const void *)h));
                dl[i] = _mm512_dpbusd_epi32(dl[i], wa, _mm512_loadu_si512((const void *)l));
                dh[i] = _mm512_dpbusd_epi32(dh[i], wb, _mm512_loadu_si512((const void *)(h + 64)));
                dl[i] = _mm512_dpbusd_epi32(dl[i], wb, _mm512_loadu_si512((const void *)(l + 64)));
            }
        }
        __m512i idx = lane_groups(cg);
        __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, ws + c));
        for (int i = 0; i < mt; i++) {
            __m512 f = _mm512_permutexvar_ps(idx, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, xd + i * G + c)));
            __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dh[i], 7), dl[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[i]);
            // the min term per group: m * (sum of the block's activations); symmetric: sum s * xs, times -zero
            __m512 mv = wm ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, wm + c)) : sv;
            accm[i] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xs + i * G + c), accm[i]);
        }
    }
    const __m512 mz = _mm512_set1_ps(wm ? 1.f : -zero);
    for (int i = 0; i < mt; i++) out[i] = hsum(_mm512_fmadd_ps(accm[i], mz, acc[i]));
}

#define ROWS(CALL)                                                                                                     \
    for (int64_t m0 = 0; m0 < M; m0 += MT) {                                                                           \
        float o[MT];                                                                                                   \
        int64_t left = M - m0;                                                                                         \
        if (left >= 4) CALL(4);                                                                                        \
        else if (left == 3) CALL(3);                                                                                   \
        else if (left == 2) CALL(2);                                                                                   \
        else CALL(1);                                                                                                  \
        for (int64_t i = 0; i < (left < MT ? left : MT); i++) y[(m0 + i) * N + n] = FINISH(o[i]);                      \
    }

// y[m, n] for n in [0, N): weights q (N, K/2) nibbles, scales/mins (N, K/32) fp16 (mins NULL: m = -zero s).
void gemrun_q4_mm(const float *x, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scales,
                  const uint16_t *mins, int64_t zero, int64_t N, float *y, int8_t *xq, float *xd, float *xs,
                  int nthreads) {
    int64_t G = K / QK;
    quantize_rows(x, M, K, xq, xd, xs, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(mt) dot_row(q + n * (K / 2), 0, scales + n * G, mins ? mins + n * G : 0, (float)zero, G, K, xq + m0 * K, \
                         xq + M * K + m0 * K, xd + m0 * G, xs + m0 * G, mt, o)
#define FINISH(v) (v)
        ROWS(CALL)
#undef CALL
#undef FINISH
    }
}

// y[m, n] for n in [0, N): weights q (N, K) bytes, scales/mins (N, K/32) fp16 (mins NULL: m = -zero s).
void gemrun_q8_mm(const float *x, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scales,
                  const uint16_t *mins, int64_t zero, int64_t N, float *y, int8_t *xq, float *xd, float *xs,
                  int nthreads) {
    int64_t G = K / QK;
    quantize_rows(x, M, K, xq, xd, xs, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(mt) dot_row(0, q + n * K, scales + n * G, mins ? mins + n * G : 0, (float)zero, G, K, xq + m0 * K, \
                         xq + M * K + m0 * K, xd + m0 * G, xs + m0 * G, mt, o)
#define FINISH(v) (v)
        ROWS(CALL)
#undef CALL
#undef FINISH
    }
}

// float -> bf16 bits, round to nearest even (finite inputs)
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// Dense bf16 copies of packed rows in their stored (lane) order, for long prompts (many activation rows: a dense
// matmul is faster there); the caller permutes the activations to the same order.
static inline void dense_row(const uint8_t *stored, const float *s, const float *m, int64_t K, uint16_t *out) {
    int64_t G = K / QK;
    for (int64_t c = 0; c < G; c += chunk_groups(G, c)) {
        int cg = chunk_groups(G, c);
        for (int64_t p = 0; p < cg * QK; p += 4) {
            int64_t g = c + (p % 64 / 4) % cg;
            for (int j = 0; j < 4; j++) out[c * QK + p + j] = to_bf16((float)stored[c * QK + p + j] * s[g] + m[g]);
        }
    }
}

// (s, m) of row n's groups; mins NULL: m = -zero s
static inline void row_params(const uint16_t *scales, const uint16_t *mins, int64_t zero, int64_t n, int64_t G,
                              float *s, float *m) {
    for (int64_t g = 0; g < G; g++) {
        s[g] = _cvtsh_ss(scales[n * G + g]);
        m[g] = mins ? _cvtsh_ss(mins[n * G + g]) : -(float)zero * s[g];
    }
}

void gemrun_q4_dequant(const uint8_t *q, const uint16_t *scales, const uint16_t *mins, int64_t zero, int64_t N,
                       int64_t K, uint16_t *out, int nthreads) {
    int64_t G = K / QK;
#pragma omp parallel num_threads(nthreads)
    {
        uint8_t stored[K];
        float s[G], m[G];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = q + n * (K / 2);
            for (int64_t p = 0; p < K / 128; p++)
                for (int b = 0; b < 64; b++) {
                    stored[p * 128 + b] = row[p * 64 + b] & 15;
                    stored[p * 128 + 64 + b] = row[p * 64 + b] >> 4;
                }
            row_params(scales, mins, zero, n, G, s, m);
            dense_row(stored, s, m, K, out + n * K);
        }
    }
}

void gemrun_q8_dequant(const uint8_t *q, const uint16_t *scales, const uint16_t *mins, int64_t zero, int64_t N,
                       int64_t K, uint16_t *out, int nthreads) {
    int64_t G = K / QK;
#pragma omp parallel num_threads(nthreads)
    {
        float s[G], m[G];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            row_params(scales, mins, zero, n, G, s, m);
            dense_row(q + n * K, s, m, K, out + n * K);
        }
    }
}
