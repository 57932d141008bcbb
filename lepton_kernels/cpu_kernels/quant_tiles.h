/* Tiles of the CPU quant_matmul (quant_gemm.c includes this file): the row pointers and
 * store of a tile, the dot-product tiles of the batched path, and the drivers that spread decode
 * and batched tiles over threads. A tile holds MB rows of x by NB weight rows; its accumulators
 * are vectors along K, summed across lanes once at the end. */
#ifndef LEPTON_QUANT_TILES_H
#define LEPTON_QUANT_TILES_H
#define PREFETCH_BYTES (4 << 20)   /* int8 tiles fetch ahead on weights larger than this */
#include <stdlib.h>
#include "quant_simd.h"

typedef struct {
    const float *x; int64_t ldx;       /* x rows, ldx floats apart */
    float *y; int64_t ldy;             /* y rows, ldy floats apart */
    const float *bias;                 /* [N] or NULL */
    int64_t M, N, K;
} io_t;

/* Row pointers of a tile; rows past the edge point at its first row (results dropped). */
#define TILE_ROWS(MB, NB, m0, n0)                                                          \
    const float *xr[MB_MAX];                                                               \
    int64_t nr[NB_MAX];                                                                    \
    float tail[MB_MAX][NB_MAX];                                                            \
    for (int i = 0; i < MB; i++) xr[i] = io->x + (m0 + i < io->M ? m0 + i : m0) * io->ldx; \
    for (int r = 0; r < NB; r++) nr[r] = n0 + r < io->N ? n0 + r : n0;                     \
    for (int i = 0; i < MB; i++)                                                           \
        for (int r = 0; r < NB; r++) tail[i][r] = 0.f;

/* tail += the lane sums of acc. Macros, not functions: taking the accumulators' address would
 * keep them in memory instead of registers. */
#define ADD_LANES(MB, NB, acc)                                                             \
    for (int i = 0; i < MB; i++)                                                           \
        for (int r = 0; r < NB; r++) tail[i][r] += hsum(acc[i][r]);

/* y = tail [* row_scale] [+ bias] for the tile's entries inside y. */
#define STORE_TILE(MB, NB, m0, n0, row_scale)                                              \
    for (int i = 0; i < MB; i++)                                                           \
        for (int r = 0; r < NB; r++) {                                                     \
            if (m0 + i >= io->M || n0 + r >= io->N) continue;                              \
            float sum = tail[i][r];                                                        \
            if (row_scale) sum *= ((const float *)row_scale)[n0 + r];                      \
            if (io->bias) sum += io->bias[n0 + r];                                         \
            io->y[(m0 + i) * io->ldy + n0 + r] = sum;                                      \
        }


/* Batched: one MB x NB tile of y over weight rows wr[r] (K apart), each vector of them read by
 * LOAD(wr[r] + k) and fed to MB rows of x; AHEAD runs once per step of k (a prefetch). A macro, not one function with a run-time choice of
 * load: gcc then allocates registers for each tile on its own (the shared version spilled
 * accumulators of the 4 x 2 tile to the stack). */
#define TILE_BODY(MB, NB, LOAD, SCALAR, row_scale, AHEAD)                                  \
    int64_t K = io->K;                                                                     \
    vf acc[MB_MAX][NB_MAX];                                                                \
    for (int i = 0; i < MB; i++)                                                           \
        for (int r = 0; r < NB; r++) acc[i][r] = splat(0.f);                               \
    int64_t k = 0;                                                                         \
    for (; k + LANES <= K; k += LANES) {                                                   \
        AHEAD;                                                                             \
        vf wv[NB_MAX];                                                                     \
        for (int r = 0; r < NB; r++) wv[r] = LOAD(wr[r] + k);                              \
        for (int i = 0; i < MB; i++) {                                                     \
            vf xv = load_f(xr[i] + k);                                                     \
            IN_REG(xv);                                                                    \
            for (int r = 0; r < NB; r++) acc[i][r] += xv * wv[r];                          \
        }                                                                                  \
    }                                                                                      \
    for (; k < K; k++)                                                                     \
        for (int i = 0; i < MB; i++)                                                       \
            for (int r = 0; r < NB; r++) tail[i][r] += xr[i][k] * (SCALAR)wr[r][k];        \
    ADD_LANES(MB, NB, acc)                                                                 \
    STORE_TILE(MB, NB, m0, n0, row_scale)

/* ... over float rows w (the int4 scratch; w[0] is row n0). */
INLINE void tile_f32(const io_t *io, int64_t m0, int64_t n0, const int MB, const int NB,
                     const float *w) {
    TILE_ROWS(MB, NB, m0, n0)
    const float *wr[NB_MAX];
    for (int r = 0; r < NB; r++) wr[r] = w + (nr[r] - n0) * io->K;
    TILE_BODY(MB, NB, load_f, float, NULL, (void)0)
}

/* ... over int8 rows of q converted in registers: each converted vector feeds MB rows of x and
 * the conversion issues beside the FMAs, so int8 needs no scratch; the scale multiplies the sums. */
INLINE void tile_int8(const io_t *io, int64_t m0, int64_t n0, const int MB, const int NB,
                      const int8_t *q, const float *scales) {
    TILE_ROWS(MB, NB, m0, n0)
    const int8_t *wr[NB_MAX];
    for (int r = 0; r < NB; r++) wr[r] = q + nr[r] * io->K;
    /* A weight larger than the caches (an LM head) streams from memory: the next tile's rows
     * are fetched ahead (see decode_int8 in quant_gemm.c). One that stays in L2/L3 is left to
     * the hardware: there the prefetches cost more than they save (2752 x 512 at 4-8 rows: 20%
     * slower; a 32000 x 512 head at 2-8 rows: 20-40% faster). */
    const char *next = (const char *)(q + (n0 + NB) * io->K);
    const int ahead = io->N * io->K > PREFETCH_BYTES;
    TILE_BODY(MB, NB, int8_to_f, float, scales, if (ahead) __builtin_prefetch(next + k * NB))
}

/* One tile of mb (1 .. TILE_MB) rows of x by TILE_NB weight rows, through a switch to constant
 * tile sizes so the accumulators stay in registers. Not inlined into the OpenMP loop: there gcc
 * versioned the loop and spilled the accumulators of one of the copies (M = 8 ran 2x slower). */
#define TILE_SWITCH(TILE, ...)                                                             \
    switch (mb) {                                                                          \
    case 1: TILE(io, m0, n0, 1, TILE_NB, __VA_ARGS__); break;                              \
    case 2: TILE(io, m0, n0, 2, TILE_NB, __VA_ARGS__); break;                              \
    case 3: TILE(io, m0, n0, 3, TILE_NB, __VA_ARGS__); break;                              \
    case 4: TILE(io, m0, n0, 4, TILE_NB, __VA_ARGS__); break;                              \
    case 5: TILE(io, m0, n0, 5, TILE_NB, __VA_ARGS__); break;                              \
    default: TILE(io, m0, n0, TILE_MB, TILE_NB, __VA_ARGS__); break;                       \
    }
static __attribute__((noinline)) void tiles_f32(const io_t *io, int64_t m0, int64_t n0, int mb,
                                                const float *w) {
    TILE_SWITCH(tile_f32, w)
}
static __attribute__((noinline)) void tiles_int8(const io_t *io, int64_t m0, int64_t n0, int mb,
                                                 const int8_t *q, const float *scales) {
    TILE_SWITCH(tile_int8, q, scales)
}


/* The batched path over blocks of N_BLOCK weight rows; with SCRATCH (int4) each thread first
 * dequantizes the block into its scratch w and tiles over it; int8 (q) tiles the packed rows.
 * The last M % TILE_MB rows of x take narrower tiles. Returns -1 when a scratch cannot be had. */
#define BATCHED(SCRATCH, DEQUANT, TILES, ...)                                            \
    int failed = 0;                                                                        \
    int64_t blocks = (io.N + N_BLOCK - 1) / N_BLOCK;                                       \
    _Pragma("omp parallel if (io.N * io.K * io.M > 65536)")                                \
    {                                                                                      \
        float *w = SCRATCH ? malloc((size_t)(N_BLOCK * io.K) * sizeof(float)) : NULL;      \
        if (SCRATCH && !w) {                                                               \
            _Pragma("omp atomic write")                                                    \
            failed = 1;                                                                    \
        }                                                                                  \
        _Pragma("omp for schedule(static)")                                                \
        for (int64_t b = 0; b < blocks; b++) {                                             \
            if (SCRATCH && !w) continue;                                                   \
            int64_t n0 = b * N_BLOCK, m0 = 0;                                              \
            int rows = io.N - n0 < N_BLOCK ? (int)(io.N - n0) : N_BLOCK;                   \
            DEQUANT;                                                                       \
            /* ceil(M / TILE_MB) row tiles of near-equal size: M = 8 runs as 4 + 4, not 6 + 2 */ \
            int64_t tiles = (io.M + TILE_MB - 1) / TILE_MB;                                \
            for (int64_t t = 0; t < tiles; t++) {                                          \
                int mb = (int)(io.M / tiles + (t < io.M % tiles));                         \
                for (int64_t n = n0; n < n0 + rows; n += TILE_NB) {                        \
                    const float *wn = SCRATCH ? w + (n - n0) * io.K : NULL;                \
                    (void)wn;                                                              \
                    TILES(&io, m0, n, mb, __VA_ARGS__);                                    \
                }                                                                          \
                m0 += mb;                                                                  \
            }                                                                              \
        }                                                                                  \
        free(w);                                                                           \
    }                                                                                      \
    return failed ? -1 : 0;

/* Decode rows of x one at a time, threads over blocks of N_BLOCK output rows. */
#define DECODE(TILE, NB, ...)                                                              \
    int64_t blocks = (io.N + N_BLOCK - 1) / N_BLOCK;                                       \
    _Pragma("omp parallel for schedule(static) if (io.N * io.K * io.M > 65536)")           \
    for (int64_t b = 0; b < blocks; b++)                                                   \
        for (int64_t m = 0; m < io.M; m++)                                                 \
            for (int64_t n = b * N_BLOCK; n < (b + 1) * N_BLOCK && n < io.N; n += NB)      \
                TILE(&io, m, n, NB, __VA_ARGS__);

#endif
