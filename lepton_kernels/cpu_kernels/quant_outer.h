/* The outer-product path of the CPU quant_matmul (quant_gemm.c includes this file), for
 * batches of XT_ROWS rows of x and more:
 *
 *     y[m, n] = sum_k W'[n, k] * xt[k, m]        xt = x^T, its M rows padded to a multiple of LANES
 *
 * xt is packed in panels of XT_MV * LANES rows of x (the last one narrower), each panel [K][width]
 * contiguous, so a tile walks its panel sequentially: with one [K][M] block, a large M put the
 * rows of a tile's k steps M floats apart, on the same few L1 sets (M = 2048: 4x slower).
 *
 * A tile holds XT_TN weight rows by XT_MV * LANES rows of x: per k it loads XT_MV vectors of
 * xt[k, m0 ...] (contiguous) and broadcasts XT_TN weights, then runs XT_TN * XT_MV FMAs into
 * as many accumulators: 12 FMAs per 8 loads on AVX2 (6 x 16), no lane sums. That is the shape of
 * the float32 GEMM microkernels (oneDNN's among them) with the roles of x and W swapped: the
 * weight is the broadcast operand, so it can stay in its canonical row-major layout, and only
 * x, small and shared by all N rows, is transposed, once per call.
 * The weight rows come from the caller's dequantize-rows function into a per-thread scratch of
 * XT_NBLK rows (L1/L2-resident), so each weight is converted once per call, not once per tile.
 * The tile sizes follow the register file (accumulators + XT_MV x vectors + one broadcast):
 *     AVX-512 (32 registers)  8 x 3 vectors = 24 accumulators, 48 rows of x
 *     AVX2, SSE (16)          6 x 2 vectors = 12 accumulators
 */
#ifndef LEPTON_QUANT_OUTER_H
#define LEPTON_QUANT_OUTER_H
#include <stdlib.h>
#include "quant_simd.h"

#if defined(__AVX512F__)
#define XT_TN 8
#define XT_MV 3
#else
#define XT_TN 6
#define XT_MV 2
#endif
#define XT_NBLK (2 * XT_TN)   /* weight rows dequantized per thread work item */
/* From this many rows of x on, this path beats the dot-product tiles of quant_gemm.c. Measured
 * here (AVX2, one thread, vs float32 oneDNN on the ~55M Llama's shapes): at 16 rows and more it
 * is faster for int4 and int8; at 8-12 rows the dot tiles are (xt pads M to whole vectors). */
#define XT_ROWS 16

/* XT_TN rows of y[m0 .. m0 + MV * LANES) (those < M), columns n0 .. n0 + nvalid, from the
 * dequantized rows w (K floats apart) and the panel xt of MV * LANES rows of x ([K][MV * LANES]).
 * Missing rows (nvalid < XT_TN) reuse row 0; their results are dropped. */
INLINE void xt_tile(const float *xt, int64_t K, const float *w, int64_t n0,
                    int64_t nvalid, int64_t m0, const int MV, float *y, int64_t ldy, int64_t M,
                    const float *bias) {
    const float *wr[XT_TN];
    for (int i = 0; i < XT_TN; i++) wr[i] = w + (i < nvalid ? i : 0) * K;
    vf acc[XT_TN][XT_MV];
    for (int i = 0; i < XT_TN; i++)
        for (int v = 0; v < MV; v++) acc[i][v] = splat(0.f);
    const float *xp = xt;
    for (int64_t k = 0; k < K; k++, xp += MV * LANES) {
        vf xv[XT_MV];
        for (int v = 0; v < MV; v++) xv[v] = load_f(xp + v * LANES);
        for (int i = 0; i < XT_TN; i++) {
            vf b = bcast(wr[i] + k);
            for (int v = 0; v < MV; v++) acc[i][v] += b * xv[v];
        }
    }
    /* Through a copy: indexing the accumulators' lanes directly makes gcc keep them in memory,
     * storing all of them on every k. */
    float out[XT_TN][XT_MV * LANES];
    for (int i = 0; i < XT_TN; i++)
        for (int v = 0; v < MV; v++) {
            vf a = acc[i][v];
            memcpy(out[i] + v * LANES, &a, sizeof a);
        }
    for (int i = 0; i < XT_TN && i < nvalid; i++) {
        float b = bias ? bias[n0 + i] : 0.f;
        for (int l = 0; l < MV * LANES && m0 + l < M; l++) y[(m0 + l) * ldy + n0 + i] = out[i][l] + b;
    }
}

/* Every row tile of x against XT_TN weight rows; full tiles of XT_MV vectors, then single ones.
 * Not inlined: one copy of each tile shape, compiled on its own (see quant_gemm.c's tiles). */
static __attribute__((noinline)) void xt_tiles(const float *xt, int64_t Mp, int64_t K,
                                               const float *w, int64_t n0, int64_t nvalid,
                                               float *y, int64_t ldy, int64_t M, const float *bias) {
    int64_t m0 = 0;
    for (; m0 + XT_MV * LANES <= Mp; m0 += XT_MV * LANES)
        xt_tile(xt + m0 * K, K, w, n0, nvalid, m0, XT_MV, y, ldy, M, bias);
    for (; m0 < Mp; m0 += LANES)   /* the last panel, narrower: tiles of one vector */
        xt_tile(xt + m0 * K, K, w, n0, nvalid, m0, 1, y, ldy, M, bias);
}

/* The panels of xt, as xt_tiles walks them: full ones of w = XT_MV * LANES rows, then ones of
 * w = LANES; the panel of rows m0 on starts at xt + m0 * K and holds xt[k, m0 + i] at
 * [k * w + i]: x[m0 + i, col(k)]
 * for rows < M, 0 past them. col is the identity, or with int4's block order (block_order != 0)
 * the input that column k of a block of BLOCK_K holds: the evens of the block, then its odds
 * (see nibbles_to_f). */
static void pack_x_panels(const float *x, int64_t M, int64_t K, int64_t Mp, float *xt, int block_order) {
    for (int64_t m0 = 0, width; m0 < Mp; m0 += width) {
        width = Mp - m0 >= XT_MV * LANES ? XT_MV * LANES : LANES;
        float *panel = xt + m0 * K;
        for (int64_t k = 0; k < K; k++) {
            int64_t col = k;
            if (block_order) {
                int64_t l = k % BLOCK_K, half = BLOCK_K / 2;
                col = k - l + (l < half ? 2 * l : 2 * (l - half) + 1);
            }
            for (int64_t i = 0; i < width; i++)
                panel[k * width + i] = m0 + i < M ? x[(m0 + i) * K + col] : 0.f;
        }
    }
}

/* Fills w with weight rows n0 .. n0 + rows as floats (K apart), in the column order of xt. */
typedef void (*dequant_rows_fn)(const void *wq, int64_t K, int64_t n0, int rows, float *w);

/* y[M, N] = x @ W'^T (+ bias) by outer-product tiles. Returns -1 when a scratch cannot be had. */
static int gemm_outer(const float *x, int64_t M, int64_t K, int64_t N, const float *bias, float *y,
                      const void *wq, dequant_rows_fn dequant_rows, int block_order) {
    int64_t Mp = (M + LANES - 1) / LANES * LANES;
    float *xt = malloc((size_t)(K * Mp) * sizeof(float));
    if (!xt) return -1;
    pack_x_panels(x, M, K, Mp, xt, block_order);
    int failed = 0;
    int64_t blocks = (N + XT_NBLK - 1) / XT_NBLK;
    #pragma omp parallel if (N * K * M > 65536)
    {
        float *w = malloc((size_t)(XT_NBLK * K) * sizeof(float));
        if (!w) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!w) continue;
            int64_t n0 = b * XT_NBLK;
            int rows = N - n0 < XT_NBLK ? (int)(N - n0) : XT_NBLK;
            dequant_rows(wq, K, n0, rows, w);
            for (int t = 0; t < rows; t += XT_TN)
                xt_tiles(xt, Mp, K, w + t * K, n0 + t, rows - t, y, N, M, bias);
        }
        free(w);
    }
    free(xt);
    return failed ? -1 : 0;
}
#endif
