// Attention of a chunk of queries over keys that every one of them sees (the cached part of a global layer, deep
// in a long context), on CPUs with AVX-512 BF16: the keys and values read as the cache stores them (bfloat16), the
// scores and the softmax in float32, the two products in bfloat16 dot products with float32 sums (vdpbf16ps), as
// a GPU's flash attention does. No mask: the chunk's own keys, which take the causal one, are attended apart and
// merged by log-sum-exp (model/layers.py).
//
// Layout. The queries sit in the vector lanes: a tile is 64 query rows (4 vectors of 16) of one KV head, packed
// once as bfloat16 pairs along the head dimension, so a key's pair of elements is broadcast from its row as
// stored and no key is repacked. Per block of NB keys: scores (NB x 64), an online softmax with a lazy maximum (the
// running sums are rescaled only when a block's maximum passes the kept one by e^5.5), the weights as bfloat16
// pairs of keys, and the values' pairs of keys interleaved once per super-block of SB keys (kept in L2 and used by
// every tile of the head). Each thread takes a run of tiles and passes over the keys once per head.
//
// Built with q4q8.c and ops.c into one library by gemrun/quant/native.py; called only where the CPU has
// avx512_bf16.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define QT 64    // query rows per tile (4 vectors)
#define NB 64    // keys per softmax block
#define SB 512   // keys whose values are interleaved at once
#define LAZY 5.5f  // the kept maximum moves only when a block's passes it by this much (e^5.5 ~ 2^8)

static inline BF16 __m512 bcast_pair(const uint16_t *p) {  // one 32-bit pair of bfloat16 values to every lane
    int32_t w;
    memcpy(&w, p, 4);
    return (__m512)_mm512_set1_epi32(w);
}

// Rows [r0, r0 + n) of a (R, D) float32 head, as bfloat16 pairs [D/2][QT][2]; rows past n are zero.
static void pack_queries(const float *q, int64_t n, int64_t D, uint16_t *qp) {
    memset(qp, 0, (size_t)D * QT * 2);
    for (int64_t r = 0; r < n; r++)
        for (int64_t d = 0; d < D; d++) qp[(d >> 1) * QT * 2 + r * 2 + (d & 1)] = bf16_bits(q[r * D + d]);
}

// Value rows [0, n) (row stride D) as pairs of keys [ceil(n/2)][D][2]; a missing last key is zero.
static BF16 void pack_values(const uint16_t *v, int64_t n, int64_t D, uint16_t *vp) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < n; j += 2) {
        const uint16_t *a = v + j * D, *b = j + 1 < n ? a + D : NULL;
        uint16_t *o = vp + j * D;
        for (int64_t d = 0; d < D; d += 32) {
            __m512i x = _mm512_loadu_si512(a + d);
            __m512i y = b ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(o + 2 * d, _mm512_permutex2var_epi16(x, lo, y));
            _mm512_storeu_si512(o + 2 * d + 32, _mm512_permutex2var_epi16(x, hi, y));
        }
    }
}

typedef struct {
    float *ot;     // (D, QT): the unnormalized output, transposed
    float m[QT];   // the kept maximum of the scaled scores
    float l[QT];   // the sum of weights under it
    uint16_t *qp;  // packed queries
} tile;

// Scores of keys k[0..nb) (row stride D) against one tile, times c -> st (NB, QT); rows past nb -inf.
static BF16 void scores(const tile *t, const uint16_t *k, int64_t nb, int64_t D, float c, float *st) {
    for (int64_t j0 = 0; j0 < nb; j0 += 4) {
        const uint16_t *kr[4];
        for (int i = 0; i < 4; i++) kr[i] = k + (j0 + i < nb ? j0 + i : j0) * D;
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int g = 0; g < 4; g++) acc[i][g] = _mm512_setzero_ps();
        for (int64_t p = 0; p < D / 2; p++) {
            const uint16_t *qrow = t->qp + p * QT * 2;
            __m512bh qv[4];
            for (int g = 0; g < 4; g++) qv[g] = (__m512bh)_mm512_loadu_si512(qrow + g * 32);
            for (int i = 0; i < 4; i++) {
                __m512bh kb = (__m512bh)bcast_pair(kr[i] + 2 * p);
                for (int g = 0; g < 4; g++) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], qv[g], kb);
            }
        }
        const __m512 cc = _mm512_set1_ps(c), ninf = _mm512_set1_ps(-INFINITY);
        for (int i = 0; i < 4; i++)
            for (int g = 0; g < 4; g++)
                _mm512_storeu_ps(st + (j0 + i) * QT + g * 16, j0 + i < nb ? _mm512_mul_ps(acc[i][g], cc) : ninf);
    }
}

// The online softmax over a block's scores: the kept maximum and sums updated (the output rescaled where the
// maximum moved), the weights as bfloat16 pairs of keys pp [ceil(nb/2)][QT][2].
static BF16 void weigh(tile *t, const float *st, int64_t nb, int64_t D, uint16_t *pp) {
    const __m512i il = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                        21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int g = 0; g < 4; g++) {
        __m512 mb = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < nb; j++) mb = _mm512_max_ps(mb, _mm512_loadu_ps(st + j * QT + g * 16));
        __m512 m = _mm512_loadu_ps(t->m + g * 16);
        __mmask16 move = _mm512_cmp_ps_mask(mb, _mm512_add_ps(m, _mm512_set1_ps(LAZY)), _CMP_GT_OQ);
        __m512 l = _mm512_loadu_ps(t->l + g * 16);
        if (move) {
            __m512 m2 = _mm512_mask_mov_ps(m, move, mb);
            __m512 alpha = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), move, exp16(_mm512_sub_ps(m, m2)));
            l = _mm512_mul_ps(l, alpha);
            for (int64_t d = 0; d < D; d++) {
                float *o = t->ot + d * QT + g * 16;
                _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
            }
            m = m2;
            _mm512_storeu_ps(t->m + g * 16, m);
        }
        for (int64_t j = 0; j < nb; j += 2) {
            __m512 a = exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j * QT + g * 16), m));
            __m512 b = j + 1 < nb ? exp16(_mm512_sub_ps(_mm512_loadu_ps(st + (j + 1) * QT + g * 16), m))
                                  : _mm512_setzero_ps();
            l = _mm512_add_ps(l, _mm512_add_ps(a, b));
            __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a in the low half, b in the high
            _mm512_storeu_si512(pp + (j / 2) * QT * 2 + g * 32, _mm512_permutexvar_epi16(il, ab));
        }
        _mm512_storeu_ps(t->l + g * 16, l);
    }
}

// ot (D, QT) += the block's weights pp times its values vp (pairs of keys [np][D][2]).
static BF16 void accumulate(tile *t, const uint16_t *pp, const uint16_t *vp, int64_t np, int64_t D) {
    for (int64_t d0 = 0; d0 < D; d0 += 4) {
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int g = 0; g < 4; g++) acc[i][g] = _mm512_loadu_ps(t->ot + (d0 + i) * QT + g * 16);
        for (int64_t j = 0; j < np; j++) {
            const uint16_t *prow = pp + j * QT * 2, *vrow = vp + j * D * 2 + d0 * 2;
            __m512bh pv[4];
            for (int g = 0; g < 4; g++) pv[g] = (__m512bh)_mm512_loadu_si512(prow + g * 32);
            for (int i = 0; i < 4; i++) {
                __m512bh vb = (__m512bh)bcast_pair(vrow + 2 * i);
                for (int g = 0; g < 4; g++) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], pv[g], vb);
            }
        }
        for (int i = 0; i < 4; i++)
            for (int g = 0; g < 4; g++) _mm512_storeu_ps(t->ot + (d0 + i) * QT + g * 16, acc[i][g]);
    }
}

// q (KV, R, D) float32; k, v bfloat16, head h's key s at k + h * head_stride + s * D, S keys; every query sees
// every key. -> out (KV, R, D) float32, lse (KV, R) (natural log of the sum of exp(score * scale)); 0, or -1 when
// its scratch could not be allocated (nothing written).
BF16 int gemrun_flash_bf16(const float *q, int64_t KV, int64_t R, int64_t D, const uint16_t *k, const uint16_t *v,
                            int64_t head_stride, int64_t S, float scale, float *out, float *lse, int nthreads) {
    const int64_t tiles = (R + QT - 1) / QT, items = KV * tiles;
    const float c = scale;
    tile *ts = calloc((size_t)items, sizeof(tile));
    float *ot = aligned_alloc(64, (size_t)items * D * QT * 4);
    uint16_t *qp = aligned_alloc(64, (size_t)items * D * QT * 2);
    const size_t per_thread = (size_t)(SB * D + NB * QT) * 2 + (size_t)NB * QT * 4;
    char *work = aligned_alloc(64, ((per_thread + 63) / 64 * 64) * nthreads);
    if (!ts || !ot || !qp || !work) {
        free(work), free(qp), free(ot), free(ts);
        return -1;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int id = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t i0 = items * id / n, i1 = items * (id + 1) / n;
        char *mine = work + (per_thread + 63) / 64 * 64 * id;
        uint16_t *vp = (uint16_t *)mine, *pp = vp + SB * D;
        float *st = (float *)(pp + NB * QT);
        for (int64_t it = i0; it < i1; it++) {
            tile *t = ts + it;
            const int64_t h = it / tiles, r0 = it % tiles * QT, nr = R - r0 < QT ? R - r0 : QT;
            t->ot = ot + it * D * QT;
            t->qp = qp + it * D * QT;
            memset(t->ot, 0, (size_t)D * QT * 4);
            for (int r = 0; r < QT; r++) t->m[r] = -INFINITY, t->l[r] = 0.f;
            pack_queries(q + (h * R + r0) * D, nr, D, t->qp);
        }
        for (int64_t a = i0; a < i1;) {  // the run's tiles of one head, then the next head's
            const int64_t h = a / tiles, b = (h + 1) * tiles < i1 ? (h + 1) * tiles : i1;
            const uint16_t *kh = k + h * head_stride, *vh = v + h * head_stride;
            for (int64_t s0 = 0; s0 < S; s0 += SB) {
                const int64_t sn = S - s0 < SB ? S - s0 : SB;
                pack_values(vh + s0 * D, sn, D, vp);
                for (int64_t it = a; it < b; it++)
                    for (int64_t b0 = 0; b0 < sn; b0 += NB) {
                        const int64_t nb = sn - b0 < NB ? sn - b0 : NB;
                        scores(ts + it, kh + (s0 + b0) * D, nb, D, c, st);
                        weigh(ts + it, st, nb, D, pp);
                        accumulate(ts + it, pp, vp + b0 * D, (nb + 1) / 2, D);
                    }
            }
            a = b;
        }
        for (int64_t it = i0; it < i1; it++) {
            const tile *t = ts + it;
            const int64_t h = it / tiles, r0 = it % tiles * QT, nr = R - r0 < QT ? R - r0 : QT;
            for (int64_t r = 0; r < nr; r++) {
                const float inv = 1.f / t->l[r];
                float *o = out + (h * R + r0 + r) * D;
                for (int64_t d = 0; d < D; d++) o[d] = t->ot[d * QT + r] * inv;
                lse[h * R + r0 + r] = t->m[r] + logf(t->l[r]);
            }
        }
    }
    free(work);
    free(qp);
    free(ot);
    free(ts);
    return 0;
}
