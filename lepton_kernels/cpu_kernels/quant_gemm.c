/* Weight-only quantized matmul on the CPU: y[M, N] = x[M, K] @ W'^T (+ bias), float32.
 *
 * W' is lepton_kernels/ops/quantize.py's dequantize, computed on the canonical packed layout:
 *   int8:  W'[n, k] = (q[n, k] - z[n, j]) * s[n, j]       q int8 [N, K]
 *   int4:  W'[n, k] = (q[n, k] - z[n, j]) * s[n, j]       q the nibbles of the int32 words
 * with j = k / group_size; int8 per output channel is group_size = K; z = 0 when symmetric (int8
 * zeros NULL). An act-order permutation is applied to x's columns by the caller.
 * int4 reads the canonical packed words as bytes: byte b of a row holds input 2b in its low
 * nibble and 2b + 1 in its high one, so one 16-byte load gives the 16 even and the 16 odd inputs
 * of a block of BLOCK_K = 32 with a mask and a shift. To match, x's columns are reordered per
 * block (evens, then odds): an M x K scratch per call instead of a repacked copy of the weight.
 * zeros arrive as float32 (converted at prepare time).
 *
 * Three paths, each blocked so every value sits in a register while it is reused:
 * - decode (M < TILE_MB): each weight is converted in registers and used once per row of x, so
 *   the packed weight streams from memory once per row: 1 or 1/2 byte per weight instead of 4.
 *   Tiles of 1 x NB rows keep NB independent FMA chains. Plain int8 (per channel, symmetric)
 *   multiplies a row's sum by s[n] once: s * sum(x q). Groups sum x q per group and fold each in
 *   with its scale and zero: sum_j s_j * (sum_{k in j} x_k q_k - z_j * sum_{k in j} x_k), the
 *   per-group sums of x computed once per call.
 * - batched (TILE_MB <= M < XT_ROWS): TILE_MB x TILE_NB dot-product tiles, each weight vector
 *   loaded once per tile and fed to TILE_MB rows of x. Plain int8 converts it in registers (the
 *   conversion issues on other ports than the FMAs, so it is nearly free at 6 rows); the others,
 *   whose conversion also needs a group's scale and zero (more registers than a 6 x 2 tile has
 *   left), have each thread dequantize a block of N_BLOCK rows into a float scratch first.
 * - outer product (M >= XT_ROWS, quant_outer.h): x transposed once into panels, weight rows
 *   dequantized a block at a time, tiles of broadcast weights times vectors of x.
 * Threads (OpenMP, the runtime torch already loaded) split the output rows in blocks. Edge
 * tiles point their missing rows at the tile's first row and drop those results. Every path is
 * a float32 dot product of the same values, so results differ from the eager spec by float32
 * rounding only.
 * The sources have no Python or torch dependency: quant_gemm.c (with the headers it includes)
 * is compiled on first use with the system C compiler for the host CPU (-march=native).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_simd.h"

#include "quant_tiles.h"

/* Decode: one 1 x NB tile of y for int8 weights q [N, K], scales [N], converted in registers. */
INLINE void decode_int8(const io_t *io, int64_t m0, int64_t n0, const int NB, const int8_t *q,
                        const float *scales) {
    int64_t K = io->K;
    TILE_ROWS(1, NB, m0, n0)
    const int8_t *qr[NB_MAX];
    vf acc[MB_MAX][NB_MAX];
    for (int r = 0; r < NB; r++) {
        qr[r] = q + nr[r] * K;
        acc[0][r] = splat(0.f);
    }
    /* The next tile's rows (NB * K contiguous bytes), fetched ahead a slice per step: rows of a
     * few hundred bytes end before the hardware prefetcher has learned their stream, and a
     * 32000 x 512 LM head ran at a third of the memory bandwidth (3.4 ms -> 1.0 ms here). */
    const char *next = (const char *)(q + (n0 + NB) * K);
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES) {
        __builtin_prefetch(next + k * NB);
        vf xv = load_f(xr[0] + k);
        IN_REG(xv);
        for (int r = 0; r < NB; r++) acc[0][r] += xv * int8_to_f(qr[r] + k);
    }
    for (; k < K; k++)   /* K not a multiple of LANES */
        for (int r = 0; r < NB; r++) tail[0][r] += xr[0][k] * (float)qr[r][k];
    ADD_LANES(1, NB, acc)
    STORE_TILE(1, NB, m0, n0, scales)
}

/* The weight as the kernels read it: q int8 [N, K], or int4's packed bytes [N, K / 2]; scales
 * and zeros (float32, or NULL: symmetric) [N, K / group_size]; int8 per channel: group_size K. */
typedef struct {
    const void *q;
    const float *scales, *zeros;
    int64_t group_size;
} qweight_t;

/* Decode: one 1 x NB tile of y in groups (int8 grouped or with zeros, int4): sums x q per group
 * and folds each group in with its scale and zero, sum_j s_j (sum_{k in j} x_k q_k - z_j xsum_j),
 * xsum[j] = the sum of x's row over group j (NULL without zeros). int4: x in block order, K a
 * multiple of the group size, itself of BLOCK_K; int8: any group size (a scalar tail). */
INLINE void decode_groups(const io_t *io, int64_t m0, int64_t n0, const int NB, const int BITS,
                          const qweight_t *qw, const float *xsum) {
    int64_t K = io->K, gs = qw->group_size, groups = K / gs;
    TILE_ROWS(1, NB, m0, n0)
    const int8_t *qr[NB_MAX];
    const uint8_t *pr[NB_MAX];
    for (int r = 0; r < NB; r++) {
        qr[r] = (const int8_t *)qw->q + nr[r] * K;
        pr[r] = (const uint8_t *)qw->q + nr[r] * (K / 2);
    }
    const float *xs = xsum ? xsum + (m0 < io->M ? m0 : 0) * groups : NULL;
    /* the next tile's rows, fetched ahead (see decode_int8) */
    const char *next = BITS == 4 ? (const char *)(pr[0] + NB * (K / 2)) : (const char *)(qr[0] + NB * K);
    vf acc[MB_MAX][NB_MAX];
    for (int r = 0; r < NB; r++) acc[0][r] = splat(0.f);
    for (int64_t j = 0; j < groups; j++) {
        /* one chain per row: two (int4's evens and odds) would spill on AVX2 */
        vf part[NB_MAX];
        float part_tail[NB_MAX] = {0};
        for (int r = 0; r < NB; r++) part[r] = splat(0.f);
        int64_t k = j * gs, end = (j + 1) * gs;
        if (BITS == 4) {
            for (; k < end; k += BLOCK_K)
                for (int h = 0; h < BLOCK_K / 2; h += LANES) {
                    __builtin_prefetch(next + (k / 2 + h) * NB);
                    vf xe = load_f(xr[0] + k + h), xo = load_f(xr[0] + k + BLOCK_K / 2 + h);
                    IN_REG(xe);
                    IN_REG(xo);
                    for (int r = 0; r < NB; r++) {
                        vf lo, hi;
                        nibbles_to_f(pr[r] + k / 2 + h, &lo, &hi);
                        part[r] += xe * lo;
                        part[r] += xo * hi;
                    }
                }
        } else {
            for (; k + LANES <= end; k += LANES) {
                __builtin_prefetch(next + k * NB);
                vf xv = load_f(xr[0] + k);
                IN_REG(xv);
                for (int r = 0; r < NB; r++) part[r] += xv * int8_to_f(qr[r] + k);
            }
            for (; k < end; k++)
                for (int r = 0; r < NB; r++) part_tail[r] += xr[0][k] * (float)qr[r][k];
        }
        for (int r = 0; r < NB; r++) {   /* lanes fold into acc; the zero term is a scalar */
            float sc = qw->scales[nr[r] * groups + j];
            acc[0][r] += part[r] * sc;
            tail[0][r] += sc * part_tail[r];
            if (xs) tail[0][r] -= sc * qw->zeros[nr[r] * groups + j] * xs[j];
        }
    }
    ADD_LANES(1, NB, acc)
    STORE_TILE(1, NB, m0, n0, NULL)
}

/* Weight rows n0 .. n0 + rows as floats (q - z) * s, K apart (dequant_rows_fn of quant_outer.h).
 * int8: natural column order; int4: x's block order (evens, then odds, of each BLOCK_K). */
static void dequant_rows_int8(const void *p, int64_t K, int64_t n0, int rows, float *w) {
    const qweight_t *qw = p;
    int64_t gs = qw->group_size, groups = K / gs;
    for (int r = 0; r < rows; r++) {
        const int8_t *row = (const int8_t *)qw->q + (n0 + r) * K;
        float *out = w + r * K;
        for (int64_t j = 0; j < groups; j++) {
            float sc = qw->scales[(n0 + r) * groups + j];
            float z = qw->zeros ? qw->zeros[(n0 + r) * groups + j] : 0.f;
            int64_t k = j * gs;
            for (; k + LANES <= (j + 1) * gs; k += LANES) {
                vf v = (int8_to_f(row + k) - z) * sc;
                memcpy(out + k, &v, sizeof v);
            }
            for (; k < (j + 1) * gs; k++) out[k] = ((float)row[k] - z) * sc;
        }
    }
}

static void dequant_rows_int4(const void *p, int64_t K, int64_t n0, int rows, float *w) {
    const qweight_t *qw = p;
    int64_t gs = qw->group_size, groups = K / gs;
    for (int r = 0; r < rows; r++)
        for (int64_t k = 0; k < K; k += BLOCK_K) {
            const uint8_t *b = (const uint8_t *)qw->q + (n0 + r) * (K / 2) + k / 2;
            float sc = qw->scales[(n0 + r) * groups + k / gs];
            float z = qw->zeros[(n0 + r) * groups + k / gs];
            float *out = w + r * K + k;
            for (int h = 0; h < BLOCK_K / 2; h += LANES) {
                vf lo, hi;
                nibbles_to_f(b + h, &lo, &hi);
                lo = (lo - z) * sc;
                hi = (hi - z) * sc;
                memcpy(out + h, &lo, sizeof lo);
                memcpy(out + BLOCK_K / 2 + h, &hi, sizeof hi);
            }
        }
}

#include "quant_outer.h"

static int int4_batched(const io_t *iop, const qweight_t *qw) {
    io_t io = *iop;
    BATCHED(1, dequant_rows_int4(qw, io.K, n0, rows, w), tiles_f32, wn)
}

/* Per-group sums of x's rows, xsum[m, j] = sum_{k in group j} x[m, k] (decode's zero terms). */
static void group_sums(const float *x, int64_t M, int64_t K, int64_t gs, float *xsum) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < K / gs; j++) {
            float s = 0.f;
            for (int64_t k = j * gs; k < (j + 1) * gs; k++) s += x[m * K + k];
            xsum[m * (K / gs) + j] = s;
        }
}

/* y = x @ W'^T (+ bias) for int8 W' = (q - z) * s in groups of group_size (K: per channel;
 * zeros NULL: symmetric). Returns 0, or -1 when a scratch cannot be allocated. */
int lk_quant_gemm_int8(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scales,
                       const float *zeros, int64_t group_size, const float *bias, float *y, int64_t N) {
    io_t io = {x, K, y, N, bias, M, N, K};
    qweight_t qw = {q, scales, zeros, group_size};
    /* per channel and symmetric: the scale multiplies each row's sum once */
    int plain = zeros == NULL && group_size == K;
    if (M >= XT_ROWS)
        return gemm_outer(x, M, K, N, bias, y, &qw, dequant_rows_int8, 0);
    /* One row: decode tiles, eight chains per row. From two rows, plain int8 takes the tiles,
     * which convert each weight vector once for all rows (a 32000 x 512 head at 2-5 rows:
     * 20-25% faster here; the same time on the layers, whose weights stay in L2). */
    if (M == 1 && plain) {
        DECODE(decode_int8, 8, q, scales)
        return 0;
    }
    if (M < TILE_MB && !plain) {
        float *xsum = zeros ? malloc((size_t)(M * (K / group_size)) * sizeof(float)) : NULL;
        if (zeros && !xsum) return -1;
        if (zeros) group_sums(x, M, K, group_size, xsum);
        DECODE(decode_groups, DECODE_NB4, 8, &qw, xsum)
        free(xsum);
        return 0;
    }
    if (plain) {
        BATCHED(0, (void)rows, tiles_int8, q, scales)
    }
    BATCHED(1, dequant_rows_int8(&qw, io.K, n0, rows, w), tiles_f32, wn)
}

/* y = x @ W'^T (+ bias) for int4 W'. Returns 0, or -1 when a scratch cannot be allocated. */
int lk_quant_gemm_int4(const float *x, int64_t M, int64_t K, const uint8_t *packed,
                       const float *scales, const float *zeros, int64_t group_size,
                       const float *bias, float *y, int64_t N) {
    qweight_t qw = {packed, scales, zeros, group_size};
    if (M >= XT_ROWS)
        return gemm_outer(x, M, K, N, bias, y, &qw, dequant_rows_int4, 1);
    int64_t groups = K / group_size;
    /* x with columns in block order, then (decode) its per-group sums */
    float *xb = malloc((size_t)(M * K + M * groups) * sizeof(float)), *xsum = xb + M * K;
    if (!xb) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += BLOCK_K)
            for (int l = 0; l < BLOCK_K / 2; l++) {
                xb[m * K + k + l] = x[m * K + k + 2 * l];
                xb[m * K + k + BLOCK_K / 2 + l] = x[m * K + k + 2 * l + 1];
            }
    io_t io = {xb, K, y, N, bias, M, N, K};
    int status = 0;
    if (M < TILE_MB) {
        group_sums(x, M, K, group_size, xsum);
        DECODE(decode_groups, DECODE_NB4, 4, &qw, xsum)
    } else {
        status = int4_batched(&io, &qw);
    }
    free(xb);
    return status;
}

/* The dequantized weight w[N, K] in the natural column order, for the largest M, where a float32
 * GEMM on it beats the tiles above. */
void lk_dequantize_int8(const int8_t *q, const float *scales, const float *zeros, int64_t group_size,
                        int64_t N, int64_t K, float *w) {
    qweight_t qw = {q, scales, zeros, group_size};
    #pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t n = 0; n < N; n++) dequant_rows_int8(&qw, K, n, 1, w + n * K);
}

/* int4: w[N, K] in the natural column order (byte b of a row: columns 2b and 2b + 1). */
void lk_dequantize_int4(const uint8_t *packed, const float *scales, const float *zeros,
                        int64_t group_size, int64_t N, int64_t K, float *w) {
    int64_t groups = K / group_size;
    #pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += BLOCK_K) {
            const uint8_t *b = packed + n * (K / 2) + k / 2;
            float s = scales[n * groups + k / group_size], z = zeros[n * groups + k / group_size];
            float *out = w + n * K + k;
            for (int l = 0; l < BLOCK_K / 2; l++) {
                out[2 * l] = ((float)(b[l] & 15) - z) * s;
                out[2 * l + 1] = ((float)(b[l] >> 4) - z) * s;
            }
        }
}
