// Weight-only low-bit matrix products for x86-64 CPUs with AVX-512 VNNI.
//
// y (M, N) = x (M, K) . W^T with W stored packed. The activations are quantized in blocks of 32 to two int8 levels
// (x ~ d * (hi + lo / 128): about 14 bits, finer than bf16) and each block's dot product runs on integers
// (vpdpbusd), then is scaled and summed in fp32. Every (m, n) output is computed by the same instructions whatever
// M is, so a row's result does not depend on the batch it is in. Long prompts (`gemrun_mm1`) may take one int8
// level per block instead (llama.cpp's Q8_0 activations): half the integer products, in tiles of 4 weight rows x 2
// activation rows, with the scales folded in by 3 instructions per tile entry for symmetric formats.
//
// Layout ("lanes"): K is cut into chunks of cg = 16, 8 or 4 groups of 32. A chunk is cg/2 vectors of 64 values;
// in vector r, int32 lane l (bytes 4l..4l+3) holds elements e = 4 * (r * (16 / cg) + l / cg) + j, j = 0..3, of
// group l % cg. So every vpdpbusd adds into each lane products of one group only, and a chunk needs one scale
// multiply, not one per group.
//
// q4: weight = q * s + m, q in 0..15, fp16 s and m per group. Nibbles of vector pairs (r, r+1): 64 bytes whose low
//     halves are vector r and high halves vector r+1.
// q5: weight = q * s + m, q in 0..31: the low 4 bits as q4's nibbles, the high bit in a plane of N x K/8 bytes
//     (bit i of the 8 bytes of a vector: that vector's byte lane i), added as 16 where set.
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
#define PF 4  // weight rows ahead to prefetch, into L2 (it keeps more misses in flight than L1's fill buffers)

static inline int chunk_groups(int64_t G, int64_t c) {
    int64_t left = G - c;
    return left >= 16 ? 16 : left >= 8 ? 8 : 4;
}

// Stored offset, within its chunk of cg groups, of values 4 slot .. 4 slot + 3 of group gg (the lane layout above).
static inline int64_t slot_position(int cg, int gg, int slot) {
    int per = 16 / cg;
    return (slot / per) * 64 + ((slot % per) * cg + gg) * 4;
}

// 16 floats -> integers rounded to nearest even (nearbyintf), clamped to -127..127 (NaN -> -127)
static inline __m512i level16(__m512 t) {
    __m512i h = _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_max_epi32(_mm512_min_epi32(h, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
}

// One group of 32 values v -> hi and lo levels (element order) and (d, s) as `quantize_rows` describes. The sum of
// the levels h + l / 128 is exact in float (at most 20 significant bits), so it is taken from integer sums.
static inline __attribute__((always_inline)) void quantize_group(const float *v, int8_t *hi, int8_t *lo, float *d,
                                                                  float *s, const int levels) {
    const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    // max |v|, NaN counting as 0 (fmaxf's choice)
    __m512 a0 = _mm512_mask_abs_ps(_mm512_setzero_ps(), _mm512_cmp_ps_mask(v0, v0, _CMP_ORD_Q), v0);
    __m512 a1 = _mm512_mask_abs_ps(_mm512_setzero_ps(), _mm512_cmp_ps_mask(v1, v1, _CMP_ORD_Q), v1);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    float dd = amax / 127.f, id = dd > 0.f ? 1.f / dd : 0.f;
    const __m512 vid = _mm512_set1_ps(id), k128 = _mm512_set1_ps(128.f);
    __m512 t0 = _mm512_mul_ps(v0, vid), t1 = _mm512_mul_ps(v1, vid);
    __m512i h0 = level16(t0), h1 = level16(t1);
    _mm_storeu_si128((__m128i *)hi, _mm512_cvtepi32_epi8(h0));
    _mm_storeu_si128((__m128i *)(hi + 16), _mm512_cvtepi32_epi8(h1));
    int sh = _mm512_reduce_add_epi32(_mm512_add_epi32(h0, h1));
    if (levels == 1) {  // one level: x ~ dd * hi
        *d = dd, *s = dd * (float)sh;
        return;
    }
    *d = dd / 128.f;
    __m512i l0 = level16(_mm512_mul_ps(_mm512_sub_ps(t0, _mm512_cvtepi32_ps(h0)), k128));
    __m512i l1 = level16(_mm512_mul_ps(_mm512_sub_ps(t1, _mm512_cvtepi32_ps(h1)), k128));
    _mm_storeu_si128((__m128i *)lo, _mm512_cvtepi32_epi8(l0));
    _mm_storeu_si128((__m128i *)(lo + 16), _mm512_cvtepi32_epi8(l1));
    int sl = _mm512_reduce_add_epi32(_mm512_add_epi32(l0, l1));
    *s = dd * ((float)(sh * 128 + sl) / 128.f);
}

// x (M, K) fp32 -> hi levels xq[m*K ..], lo levels xq[M*K + m*K ..] in lane order; d (M, K/32) = block scale / 128
// (the integer dots come out scaled by 128); s (M, K/32) = block sums of the quantized values, unscaled by 128.
// One level (levels 1, the long-prompt kernel): hi only, d the block scale itself, s = d * (sum of hi).
// Called inside a parallel region: the chunks of every row are shared out among its threads.
static inline __attribute__((always_inline)) void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq,
                                                                 float *d, float *s, const int levels) {
    const int64_t G = K / QK, full = G / 16, chunks = full + (G % 16 >= 8) + (G % 8 >= 4);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < M * chunks; item++) {
        int64_t m = item / chunks, i = item % chunks;
        int64_t c = i < full ? 16 * i : i == full && G % 16 >= 8 ? 16 * full : G - 4;
        int cg = chunk_groups(G, c);
        int8_t *hi = xq + m * K + c * QK, *lo = xq + M * K + m * K + c * QK;
        for (int gg = 0; gg < cg; gg++) {
            int8_t h[QK], l[QK];
            quantize_group(x + m * K + (c + gg) * QK, h, l, d + m * G + c + gg, s + m * G + c + gg, levels);
            for (int slot = 0; slot < QK / 4; slot++) {  // values 4 slot .. 4 slot + 3 to their lane
                memcpy(hi + slot_position(cg, gg, slot), h + 4 * slot, 4);
                if (levels == 2) memcpy(lo + slot_position(cg, gg, slot), l + 4 * slot, 4);
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

// One packed matrix: q4 / q5 nibbles or q8 bytes (N rows), fp16 scales and mins per group (mins NULL: m = -zero *
// s), q5's plane of high bits.
typedef struct matrix {
    const uint8_t *q;
    const uint16_t *scales, *mins;
    int64_t zero, n, bits;
    const uint8_t *high;
} matrix;

// One chunk of cg groups (cg constant after inlining) at group c of `nr` weight rows against `mt` activation rows:
// the integer dots per group, scaled into acc; the min terms into accm.
static inline __attribute__((always_inline)) void dot_chunk(const matrix *w, int64_t n, int64_t K, const int8_t *xq,
                                                            const int8_t *xl, const float *xd, const float *xs,
                                                            const int nr, const int mt, const int bits, const int cg,
                                                            int64_t c, __m512 acc[4][MT], __m512 accm[4][MT],
                                                            const int levels) {
    const int64_t G = K / QK, stride = bits == 8 ? K : K / 2, base = c * QK;
    const uint8_t *rows = w->q + n * stride;
    const __m512i lo4 = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(16);
    const __mmask16 k = (__mmask16)((1u << cg) - 1);
    __m512i dh[4][MT], dl[4][MT];
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mt; i++) dh[j][i] = dl[j][i] = _mm512_setzero_si512();
    for (int r = 0; r < cg / 2; r += 2) {
        __m512i h0[MT], l0[MT], h1[MT], l1[MT];
        for (int i = 0; i < mt; i++) {
            const int8_t *h = xq + i * K + base + r * 64, *l = xl + i * K + base + r * 64;
            h0[i] = _mm512_loadu_si512((const void *)h), h1[i] = _mm512_loadu_si512((const void *)(h + 64));
            if (levels == 2)
                l0[i] = _mm512_loadu_si512((const void *)l), l1[i] = _mm512_loadu_si512((const void *)(l + 64));
        }
        for (int j = 0; j < nr; j++) {
            __m512i wa, wb;
            if (bits != 8) {
                const uint8_t *at = rows + j * stride + base / 2 + r * 32;
                _mm_prefetch((const char *)(at + PF * stride), _MM_HINT_T1);  // the same place PF rows on
                __m512i v = _mm512_loadu_si512((const void *)at);
                wa = _mm512_and_si512(v, lo4);
                wb = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
                if (bits == 5) {
                    const uint8_t *hb = w->high + (n + j) * (K / 8) + base / 8 + r * 8;
                    wa = _mm512_mask_add_epi8(wa, _load_mask64((__mmask64 *)hb), wa, sixteen);
                    wb = _mm512_mask_add_epi8(wb, _load_mask64((__mmask64 *)(hb + 8)), wb, sixteen);
                }
            } else {
                const uint8_t *at = rows + j * stride + base + r * 64;
                _mm_prefetch((const char *)(at + PF * stride), _MM_HINT_T1);
                _mm_prefetch((const char *)(at + PF * stride + 64), _MM_HINT_T1);
                wa = _mm512_loadu_si512((const void *)at);
                wb = _mm512_loadu_si512((const void *)(at + 64));
            }
            for (int i = 0; i < mt; i++) {
                dh[j][i] = _mm512_dpbusd_epi32(dh[j][i], wa, h0[i]);
                if (levels == 2) dl[j][i] = _mm512_dpbusd_epi32(dl[j][i], wa, l0[i]);
                dh[j][i] = _mm512_dpbusd_epi32(dh[j][i], wb, h1[i]);
                if (levels == 2) dl[j][i] = _mm512_dpbusd_epi32(dl[j][i], wb, l1[i]);
            }
        }
    }
    const uint16_t *ws = w->scales + n * G + c, *wm = w->mins ? w->mins + n * G + c : 0;
    if (levels == 1 && !wm) {
        // one level, symmetric weights: acc += s_w * (d_x * dot - zero * sum_x), 3 instructions a tile entry
        __m512 xdv[MT], zxs[MT];
        const __m512 z = _mm512_set1_ps((float)w->zero);
        for (int i = 0; i < mt; i++) {
            xdv[i] = _mm512_maskz_loadu_ps(k, xd + i * G + c);
            zxs[i] = _mm512_mul_ps(z, _mm512_maskz_loadu_ps(k, xs + i * G + c));
            // fewer groups: lane l holds part of group l % cg; the sum term stays in lanes < cg (counted once)
            if (cg != 16) xdv[i] = _mm512_permutexvar_ps(lane_groups(cg), xdv[i]);
        }
        for (int j = 0; j < nr; j++) {
            _mm_prefetch((const char *)(ws + (j + PF) * G), _MM_HINT_T1);
            __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, ws + j * G));
            if (cg != 16) sv = _mm512_permutexvar_ps(lane_groups(cg), sv);
            for (int i = 0; i < mt; i++)
                acc[j][i] = _mm512_fmadd_ps(sv, _mm512_fmsub_ps(xdv[i], _mm512_cvtepi32_ps(dh[j][i]), zxs[i]),
                                            acc[j][i]);
        }
        return;
    }
    for (int j = 0; j < nr; j++) {
        _mm_prefetch((const char *)(ws + (j + PF) * G), _MM_HINT_T1);
        if (wm) _mm_prefetch((const char *)(wm + (j + PF) * G), _MM_HINT_T1);
        __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, ws + j * G));
        // the min term per group: m * (sum of the block's activations); symmetric: sum s * xs, times -zero
        __m512 mv = wm ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, wm + j * G)) : sv;
        for (int i = 0; i < mt; i++) {
            __m512 f = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, xd + i * G + c));
            if (cg != 16) f = _mm512_permutexvar_ps(lane_groups(cg), f);  // 16 groups: lane l is group l
            __m512i dot = levels == 2 ? _mm512_add_epi32(_mm512_slli_epi32(dh[j][i], 7), dl[j][i]) : dh[j][i];
            acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[j][i]);
            accm[j][i] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xs + i * G + c), accm[j][i]);
        }
    }
}

// `nr` weight rows (from row n of w) against `mt` activation rows (nr, mt, bits constant after inlining):
// out[i * ostride + j] = row n + j . activation row i. The activation vectors loaded for a step serve all nr weight
// rows, and the nr * mt dot products are independent chains. Per output the instructions are the same for any
// (nr, mt). Weight rows are prefetched PF rows ahead, one line beside each line read.
static inline __attribute__((always_inline)) void dot_block(const matrix *w, int64_t n, int64_t K, const int8_t *xq,
                                                            const int8_t *xl, const float *xd, const float *xs,
                                                            const int nr, const int mt, const int bits, float *out,
                                                            int64_t ostride, const int levels) {
    const int64_t G = K / QK;
    __m512 acc[4][MT], accm[4][MT];
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mt; i++) acc[j][i] = accm[j][i] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= G; c += 16) dot_chunk(w, n, K, xq, xl, xd, xs, nr, mt, bits, 16, c, acc, accm, levels);
    if (G - c >= 8) dot_chunk(w, n, K, xq, xl, xd, xs, nr, mt, bits, 8, c, acc, accm, levels), c += 8;
    if (G - c >= 4) dot_chunk(w, n, K, xq, xl, xd, xs, nr, mt, bits, 4, c, acc, accm, levels);
    const __m512 mz = _mm512_set1_ps(w->mins ? 1.f : -(float)w->zero);
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mt; i++) out[i * ostride + j] = hsum(_mm512_fmadd_ps(accm[j][i], mz, acc[j][i]));
}

#define RB 4  // weight rows per work item

// Rows [n, n + nr) of w (nr <= RB) against all M activation rows, into y (M, ldy) at column col.
static inline __attribute__((always_inline)) void rows_block_bits(const matrix *w, int64_t n, int nr, int64_t M,
    int64_t K, const int8_t *xq, const float *xd, const float *xs, float *y, int64_t ldy, const int bits) {
    const int64_t G = K / QK;
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
        int64_t left = M - m0;
        const int8_t *h = xq + m0 * K, *l = xq + M * K + m0 * K;
        const float *d = xd + m0 * G, *s = xs + m0 * G;
        float *o = y + m0 * ldy;
#define DOT(NR, MTT, J) dot_block(w, n + (J), K, h, l, d, s, NR, MTT, bits, o + (J), ldy, 2)
        if (left == 1 && nr == RB) DOT(4, 1, 0);
        else if (left == 2 && nr == RB) DOT(2, 2, 0), DOT(2, 2, 2);
        else
            for (int j = 0; j < nr; j++) {
                if (left >= 4) DOT(1, 4, j);
                else if (left == 3) DOT(1, 3, j);
                else if (left == 2) DOT(1, 2, j);
                else DOT(1, 1, j);
            }
#undef DOT
    }
}

static void rows_block(const matrix *w, int64_t n, int nr, int64_t M, int64_t K, const int8_t *xq, const float *xd,
                       const float *xs, float *y, int64_t ldy) {
    if (w->bits == 4) rows_block_bits(w, n, nr, M, K, xq, xd, xs, y, ldy, 4);
    else if (w->bits == 5) rows_block_bits(w, n, nr, M, K, xq, xd, xs, y, ldy, 5);
    else rows_block_bits(w, n, nr, M, K, xq, xd, xs, y, ldy, 8);
}

// y (M, sum of N) = x (M, K) . [W_0; W_1; ...]^T for `count` packed matrices sharing the input: the activations are
// quantized once (into xq (2M, K), xd and xs (M, K/32)) and the rows of all matrices shared out among the threads.
// Every thread of a parallel region calls it (ops.c's fused decode blocks run several in one region); it ends with
// a barrier.
// The work items of `count` matrices (RB weight rows each): the first item and output column of each matrix; returns
// the number of items, *ldy the output row length.
static int64_t work_items(int count, const matrix *ws, int64_t first[8], int64_t col[8], int64_t *ldy) {
    int64_t items = 0;
    *ldy = 0;
    for (int i = 0; i < count; i++) first[i] = items, col[i] = *ldy, items += (ws[i].n + RB - 1) / RB, *ldy += ws[i].n;
    return items;
}

// Work item `it` -> its matrix, first weight row *n and row count *nr.
static inline int work_item(int count, const matrix *ws, const int64_t first[8], int64_t it, int64_t *n,
                            int *nr) {
    int i = count - 1;
    while (first[i] > it) i--;
    *n = (it - first[i]) * RB;
    *nr = ws[i].n - *n < RB ? (int)(ws[i].n - *n) : RB;
    return i;
}

void gemrun_mm_team(const float *x, int64_t M, int64_t K, int count, const matrix *ws, float *y, int8_t *xq,
                    float *xd, float *xs) {
    int64_t first[8], col[8], ldy;
    const int64_t items = work_items(count, ws, first, col, &ldy);
    quantize_rows(x, M, K, xq, xd, xs, 2);  // ends with the barrier of its omp for
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t n;
        int nr;
        int i = work_item(count, ws, first, it, &n, &nr);
        rows_block(&ws[i], n, nr, M, K, xq, xd, xs, y + col[i] + n, ldy);
    }
}

// The same in one parallel region of its own.
void gemrun_mm(const float *x, int64_t M, int64_t K, int count, const matrix *ws, float *y, int8_t *xq, float *xd,
               float *xs, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    gemrun_mm_team(x, M, K, count, ws, y, xq, xd, xs);
}

#define PANEL 32  // activation rows whose one-level values (PANEL x K bytes) stay in L2 while the weights pass

// Weight rows [n, n + nr) against activation rows [0, M) at one level: tiles of 4 weight rows x 2 activation rows
// (16 integer and 8 float accumulators stay in registers: 4 x 4 tiles spill and run at half the speed).
static inline __attribute__((always_inline)) void rows_block1_bits(const matrix *w, int64_t n, int nr, int64_t M,
    int64_t K, const int8_t *xq, const float *xd, const float *xs, float *y, int64_t ldy, const int bits) {
    const int64_t G = K / QK;
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int8_t *h = xq + m0 * K;
        const float *d = xd + m0 * G, *s = xs + m0 * G;
        float *o = y + m0 * ldy;
        const int mt = M - m0 >= 2 ? 2 : 1;
#define DOT(NR, MTT, J) dot_block(w, n + (J), K, h, h, d, s, NR, MTT, bits, o + (J), ldy, 1)
        if (nr == RB && mt == 2) DOT(4, 2, 0);
        else if (nr == RB) DOT(4, 1, 0);
        else
            for (int j = 0; j < nr; j++) {
                if (mt == 2) DOT(1, 2, j);
                else DOT(1, 1, j);
            }
#undef DOT
    }
}

// y (M, sum of N) for many activation rows (prompt chunks): the activations quantized at one int8 level per block
// of 32 (x ~ d * q, as llama.cpp's Q8_0), then panels of PANEL rows against all weight rows.
void gemrun_mm1(const float *x, int64_t M, int64_t K, int count, const matrix *ws, float *y, int8_t *xq,
                float *xd, float *xs, int nthreads) {
    int64_t first[8], col[8], ldy;
    const int64_t items = work_items(count, ws, first, col, &ldy), G = K / QK;
#pragma omp parallel num_threads(nthreads)
    {
        quantize_rows(x, M, K, xq, xd, xs, 1);
        for (int64_t p = 0; p < M; p += PANEL) {
            int64_t rows = M - p < PANEL ? M - p : PANEL;
#pragma omp for schedule(static)
            for (int64_t it = 0; it < items; it++) {
                int64_t n;
                int nr;
                const matrix *w = &ws[work_item(count, ws, first, it, &n, &nr)];
                const int i = (int)(w - ws);
                const int8_t *q = xq + p * K;
                const float *d = xd + p * G, *sx = xs + p * G;
                float *o = y + p * ldy + col[i] + n;
                if (w->bits == 4) rows_block1_bits(w, n, nr, rows, K, q, d, sx, o, ldy, 4);
                else if (w->bits == 5) rows_block1_bits(w, n, nr, rows, K, q, d, sx, o, ldy, 5);
                else rows_block1_bits(w, n, nr, rows, K, q, d, sx, o, ldy, 8);
            }
        }
    }
}

// 16 floats -> bf16 bits, round to nearest even (finite inputs)
static inline __m256i to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, r), 16));
}

// A chunk's (cg groups at g) scales and mins as the 4 pieces of 16 values of every stored vector need them: value
// f of piece p sits in lane 4p + f/4, which holds group (4p + f/4) % cg. mins NULL: m = -zero s.
static inline void chunk_params(const uint16_t *scales, const uint16_t *mins, int64_t zero, int cg, __m512 S[4],
                                __m512 Mn[4]) {
    const __mmask16 k = (__mmask16)((1u << cg) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, scales));
    const __m512 m = mins ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mins))
                          : _mm512_mul_ps(_mm512_set1_ps(-(float)zero), s);
    const __m512i quarter = _mm512_srli_epi32(lane_groups(16), 2);  // lane / 4
    for (int p = 0; p < 4; p++) {
        __m512i idx = _mm512_and_si512(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * p)), _mm512_set1_epi32(cg - 1));
        S[p] = _mm512_permutexvar_ps(idx, s), Mn[p] = _mm512_permutexvar_ps(idx, m);
    }
}

// 64 stored values q (bytes) of a chunk -> bf16 q * s + m at out
static inline void dense_vector(__m512i q, const __m512 S[4], const __m512 Mn[4], uint16_t *out) {
    for (int p = 0; p < 4; p++) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, p)));
        _mm256_storeu_si256((__m256i *)(out + 16 * p), to_bf16(_mm512_fmadd_ps(v, S[p], Mn[p])));
    }
}

// Dense bf16 copies of packed rows in their stored (lane) order, for long prompts (many activation rows: a dense
// matmul is faster there); the caller permutes the activations to the same order. 4-bit rows (nibbles), with the
// 5-bit formats' high bits where `high` is given.
void gemrun_nibble_dequant(const uint8_t *q, const uint8_t *high, const uint16_t *scales, const uint16_t *mins,
                           int64_t zero, int64_t N, int64_t K, uint16_t *out, int nthreads) {
    const int64_t G = K / QK;
    const __m512i lo4 = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(16);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = q + n * (K / 2), *hb = high ? high + n * (K / 8) : 0;
        for (int64_t c = 0; c < G; c += chunk_groups(G, c)) {
            int cg = chunk_groups(G, c);
            __m512 S[4], Mn[4];
            chunk_params(scales + n * G + c, mins ? mins + n * G + c : 0, zero, cg, S, Mn);
            for (int r = 0; r < cg / 2; r += 2) {  // 64 bytes: vector r in the low nibbles, r + 1 in the high
                const int64_t at = c * QK + r * 64;
                __m512i v = _mm512_loadu_si512((const void *)(row + at / 2));
                __m512i a = _mm512_and_si512(v, lo4), b = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
                if (hb) {
                    a = _mm512_mask_add_epi8(a, _load_mask64((__mmask64 *)(hb + at / 8)), a, sixteen);
                    b = _mm512_mask_add_epi8(b, _load_mask64((__mmask64 *)(hb + at / 8 + 8)), b, sixteen);
                }
                dense_vector(a, S, Mn, out + n * K + at);
                dense_vector(b, S, Mn, out + n * K + at + 64);
            }
        }
    }
}

void gemrun_q8_dequant(const uint8_t *q, const uint16_t *scales, const uint16_t *mins, int64_t zero, int64_t N,
                       int64_t K, uint16_t *out, int nthreads) {
    const int64_t G = K / QK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < G; c += chunk_groups(G, c)) {
            int cg = chunk_groups(G, c);
            __m512 S[4], Mn[4];
            chunk_params(scales + n * G + c, mins ? mins + n * G + c : 0, zero, cg, S, Mn);
            for (int r = 0; r < cg / 2; r++)
                dense_vector(_mm512_loadu_si512((const void *)(q + n * K + c * QK + r * 64)), S, Mn,
                             out + n * K + c * QK + r * 64);
        }
}

// GGUF Q4_0 / Q8_0 blocks (N rows of K/32 blocks: fp16 scale, then 16 nibble bytes or 32 int8) -> this file's
// layouts, exactly: Q4_0 q = nibble (weight = (q - 8) s), Q8_0 q = int8 + 128 (weight = (q - 128) s); the fp16
// scales are copied as they are. One pass over the file's bytes, rows shared among the threads, 4 values (one lane's
// bytes) at a time. Returns the count of non-finite scales (the caller refuses the file).
static inline int64_t nonfinite(const uint16_t *s, int64_t count) {
    int64_t bad = 0;
    for (int64_t i = 0; i < count; i++) bad += (s[i] & 0x7C00) == 0x7C00;
    return bad;
}

// One row of K/32 blocks of `size` bytes (fp16 scale first) -> its values in lane order and its scales; the 8 slots
// of 4 values of a block come from `values(block, slot)`.
#define FROM_BLOCKS(size, values)                                                                       \
    for (int64_t c = 0; c < G; c += chunk_groups(G, c)) {                                               \
        int cg = chunk_groups(G, c);                                                                    \
        for (int gg = 0; gg < cg; gg++) {                                                               \
            const uint8_t *b = row + (c + gg) * (size);                                                 \
            memcpy(scales + n * G + c + gg, b, 2);                                                      \
            for (int slot = 0; slot < 8; slot++) {                                                      \
                uint32_t v = values(b + 2, slot);                                                       \
                memcpy(stored + c * QK + slot_position(cg, gg, slot), &v, 4);                           \
            }                                                                                           \
        }                                                                                               \
    }

static inline uint32_t q4_0_slot(const uint8_t *qs, int slot) {  // values 0..15: low nibbles, 16..31: high
    uint32_t v;
    memcpy(&v, qs + 4 * (slot % 4), 4);
    return (slot < 4 ? v : v >> 4) & 0x0F0F0F0Fu;
}

static inline uint32_t q8_0_slot(const uint8_t *qs, int slot) {  // int8 + 128
    uint32_t v;
    memcpy(&v, qs + 4 * slot, 4);
    return v ^ 0x80808080u;
}

int64_t gemrun_from_q4_0(const uint8_t *raw, int64_t N, int64_t K, uint8_t *nibbles, uint16_t *scales,
                         int nthreads) {
    int64_t G = K / QK, bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : bad)
    {
        uint8_t stored[K];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = raw + n * G * 18;
            FROM_BLOCKS(18, q4_0_slot)
            uint8_t *out = nibbles + n * (K / 2);
            for (int64_t p = 0; p < K / 128; p++)
                for (int i = 0; i < 64; i++) out[p * 64 + i] = stored[p * 128 + i] | stored[p * 128 + 64 + i] << 4;
            bad += nonfinite(scales + n * G, G);
        }
    }
    return bad;
}

int64_t gemrun_from_q8_0(const uint8_t *raw, int64_t N, int64_t K, uint8_t *q, uint16_t *scales, int nthreads) {
    int64_t G = K / QK, bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : bad)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = raw + n * G * 34;
        uint8_t *stored = q + n * K;
        FROM_BLOCKS(34, q8_0_slot)
        bad += nonfinite(scales + n * G, G);
    }
    return bad;
}
