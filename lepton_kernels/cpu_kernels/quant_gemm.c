/* Weight-only quantized matmul on the CPU: y[M, N] = x[M, K] @ W'^T (+ bias), float32.
 *
 * W' is dequantized in registers (float32) as lepton_kernels/ops/quantize.py's dequantize does,
 * never in memory (int8 applies its per-row scale to the row's sum instead, see tile_int8):
 *   int8:  W'[n, k] = q[n, k] * scales[n]                    q int8 [N, K] (the canonical layout)
 *   int4:  W'[n, k] = (q[n, k] - zeros[n, j]) * scales[n, j]  j = k / group_size
 * int4 reads the canonical packed words as bytes: byte b of a row holds input 2b in its low
 * nibble and 2b + 1 in its high one, so one 16-byte load gives the 16 even and the 16 odd inputs
 * of a block of 32 with a mask and a shift. To match, lk_quant_gemm_int4 first copies x into a
 * scratch with the columns of each block of 32 reordered (evens, then odds): M x K floats per
 * call instead of a repacked copy of the weight. zeros arrive as float32 (converted once, at
 * prepare time).
 *
 * Blocking: a tile of NB output rows x MB input rows keeps MB * NB accumulators of LANES = 16
 * floats (one AVX-512 register each), so each dequantized weight vector feeds MB rows of x and
 * each x vector NB rows of W: 4 x 4 while 4 rows of x remain, else 1 x 8 (decode: eight
 * independent FMA chains hide the FMA latency, and no lane works on a duplicated row). Decode
 * (M = 1) streams the packed weight once, which is the point: 1 or 1/2 byte per weight instead
 * of 4. Threads (OpenMP, the runtime torch already loaded) split the output rows in blocks of 8.
 * Edge tiles point their missing rows at the tile's first row and drop those results, so one
 * kernel serves every shape.
 * This file has no Python or torch dependency: it is compiled on first use with the system C
 * compiler for the host CPU (-march=native).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define N_BLOCK 8    /* output rows per thread work item: one 1 x 8 tile or two 4 x 4 tiles */
/* Tile arrays are sized for the largest tile (a variable size would make them VLAs, kept on
 * the stack); inlined with constant MB and NB, the unused entries vanish. */
#define MB_MAX 4
#define NB_MAX 8

/* GCC/Clang vector extensions: 16 lanes, lowered to AVX-512, AVX2 or SSE, whatever -march gives. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int32_t v16i32 __attribute__((vector_size(64)));

#define INLINE static inline __attribute__((always_inline))

INLINE v16f load_f(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
INLINE v16f splat(float s) { return (v16f){0} + s; }
/* Bytes widen to int32 before the float conversion: a direct byte -> float conversion is
 * lowered one lane at a time. */
INLINE v16f uint8_to_f(v16u8 b) { return __builtin_convertvector(__builtin_convertvector(b, v16i32), v16f); }
#ifdef __AVX512F__
#include <immintrin.h>
/* 16 int8 -> float (gcc 12 lowers the generic sign extension one lane at a time). */
INLINE v16f int8_to_f(const int8_t *p) {
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
/* Portable: u = q + 128 as unsigned bytes, widened and converted, minus 128 (exact). */
INLINE v16f int8_to_f(const int8_t *p) {
    v16u8 u;
    memcpy(&u, p, sizeof u);
    return uint8_to_f(u ^ (uint8_t)0x80) - 128.f;
}
#endif

typedef struct {
    const float *x; int64_t ldx;       /* x rows, ldx floats apart */
    float *y; int64_t ldy;             /* y rows, ldy floats apart */
    const float *bias;                 /* [N] or NULL */
    int64_t M, N, K;
} io_t;

/* Row pointers of a tile; rows past the edge point at its first row (results dropped). */
#define TILE_ROWS(MB, NB, m0, n0)                                                        \
    const float *xr[MB_MAX];                                                             \
    int64_t nr[NB_MAX];                                                                  \
    for (int i = 0; i < MB; i++) xr[i] = io->x + (m0 + i < io->M ? m0 + i : m0) * io->ldx;\
    for (int r = 0; r < NB; r++) nr[r] = n0 + r < io->N ? n0 + r : n0;                   \
    v16f acc[MB_MAX][NB_MAX];                                                            \
    for (int i = 0; i < MB; i++)                                                         \
        for (int r = 0; r < NB; r++) acc[i][r] = splat(0.f);

/* y = (lane sums + tail) [* row_scale] [+ bias] for the tile's rows inside y. A macro, not a
 * function: taking the accumulators' address would keep them in memory instead of registers. */
#define STORE_TILE(MB, NB, m0, n0, row_scale)                                              \
    for (int i = 0; i < MB; i++)                                                           \
        for (int r = 0; r < NB; r++) {                                                     \
            if (m0 + i >= io->M || n0 + r >= io->N) continue;                              \
            float sum = tail[i][r];                                                        \
            for (int l = 0; l < LANES; l++) sum += acc[i][r][l];                           \
            if (row_scale) sum *= ((const float *)row_scale)[n0 + r];                      \
            if (io->bias) sum += io->bias[n0 + r];                                         \
            io->y[(m0 + i) * io->ldy + n0 + r] = sum;                                      \
        }

/* One MB x NB tile of y for int8 weights q [N, K], scales [N]: the scale is constant along a
 * row, so it multiplies the row's sum once (s * sum x q, not sum x (q s): the same up to float32
 * rounding, and one multiply per output instead of one per weight). */
INLINE void tile_int8(const io_t *io, int64_t m0, int64_t n0, const int MB, const int NB,
                      const int8_t *q, const float *scales) {
    int64_t K = io->K;
    TILE_ROWS(MB, NB, m0, n0)
    const int8_t *qr[NB_MAX];
    float tail[MB_MAX][NB_MAX];
    for (int r = 0; r < NB; r++) qr[r] = q + nr[r] * K;
    for (int i = 0; i < MB; i++)
        for (int r = 0; r < NB; r++) tail[i][r] = 0.f;
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES) {
        v16f w[NB_MAX];
        for (int r = 0; r < NB; r++) w[r] = int8_to_f(qr[r] + k);
        for (int i = 0; i < MB; i++) {
            v16f xv = load_f(xr[i] + k);
            for (int r = 0; r < NB; r++) acc[i][r] += xv * w[r];
        }
    }
    for (; k < K; k++)   /* K not a multiple of 16 */
        for (int i = 0; i < MB; i++)
            for (int r = 0; r < NB; r++) tail[i][r] += xr[i][k] * (float)qr[r][k];
    STORE_TILE(MB, NB, m0, n0, scales)
}

/* One MB x NB tile of y for int4 weights (K a multiple of group_size, itself of 32); x's
 * columns are in block order (see the top of the file). */
INLINE void tile_int4(const io_t *io, int64_t m0, int64_t n0, const int MB, const int NB,
                      const uint8_t *packed, const float *scales, const float *zeros,
                      int64_t group_size) {
    int64_t K = io->K, groups = K / group_size;
    TILE_ROWS(MB, NB, m0, n0)
    const uint8_t *pr[NB_MAX];
    const float *sr[NB_MAX], *zr[NB_MAX];
    float tail[MB_MAX][NB_MAX];
    for (int r = 0; r < NB; r++) {
        pr[r] = packed + nr[r] * (K / 2);
        sr[r] = scales + nr[r] * groups;
        zr[r] = zeros + nr[r] * groups;
    }
    for (int i = 0; i < MB; i++)
        for (int r = 0; r < NB; r++) tail[i][r] = 0.f;   /* (K has no tail for int4) */
    const v16u8 low = (v16u8){0} + 15;
    for (int64_t k = 0; k < K; k += 2 * LANES) {
        int64_t j = k / group_size;
        v16f lo[NB_MAX], hi[NB_MAX];
        for (int r = 0; r < NB; r++) {
            v16u8 b;
            memcpy(&b, pr[r] + k / 2, sizeof b);
            v16f z = splat(zr[r][j]);
            float s = sr[r][j];
            lo[r] = (uint8_to_f(b & low) - z) * s;
            hi[r] = (uint8_to_f(b >> 4) - z) * s;
        }
        for (int i = 0; i < MB; i++) {
            v16f xlo = load_f(xr[i] + k), xhi = load_f(xr[i] + k + LANES);   /* evens, odds */
            for (int r = 0; r < NB; r++) {   /* two statements: two fused multiply-adds */
                acc[i][r] += xlo * lo[r];
                acc[i][r] += xhi * hi[r];
            }
        }
    }
    STORE_TILE(MB, NB, m0, n0, NULL)
}

/* Threads take blocks of N_BLOCK output rows; in a block, 4 x 4 tiles while 4 rows of x remain,
 * then 1 x 8 tiles row by row. */
#define TILE_LOOP(TILE, ...)                                                               \
    int64_t blocks = (io.N + N_BLOCK - 1) / N_BLOCK;                                       \
    _Pragma("omp parallel for schedule(static) if (io.N * io.K * io.M > 65536)")           \
    for (int64_t b = 0; b < blocks; b++) {                                                 \
        int64_t n0 = b * N_BLOCK, m0 = 0;                                                  \
        for (; m0 + 4 <= io.M; m0 += 4) {                                                  \
            TILE(&io, m0, n0, 4, 4, __VA_ARGS__);                                          \
            if (n0 + 4 < io.N) TILE(&io, m0, n0 + 4, 4, 4, __VA_ARGS__);                   \
        }                                                                                  \
        for (; m0 < io.M; m0++) TILE(&io, m0, n0, 1, 8, __VA_ARGS__);                      \
    }

void lk_quant_gemm_int8(const float *x, int64_t M, int64_t K, const int8_t *q,
                        const float *scales, const float *bias, float *y, int64_t N) {
    io_t io = {x, K, y, N, bias, M, N, K};
    TILE_LOOP(tile_int8, q, scales)
}

/* y = x @ W'^T (+ bias) for int4 W'. Returns 0, or -1 when the scratch cannot be allocated. */
int lk_quant_gemm_int4(const float *x, int64_t M, int64_t K, const uint8_t *packed,
                       const float *scales, const float *zeros, int64_t group_size,
                       const float *bias, float *y, int64_t N) {
    float *xb = malloc((size_t)(M * K) * sizeof(float));   /* x with columns in block order */
    if (!xb) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 2 * LANES)
            for (int l = 0; l < LANES; l++) {
                xb[m * K + k + l] = x[m * K + k + 2 * l];
                xb[m * K + k + LANES + l] = x[m * K + k + 2 * l + 1];
            }
    io_t io = {xb, K, y, N, bias, M, N, K};
    TILE_LOOP(tile_int4, packed, scales, zeros, group_size)
    free(xb);
    return 0;
}

/* Dequantized weight, for large M where a float32 GEMM on it beats the tile loop above.
 * int8: w[N, K] in the natural column order. */
void lk_dequantize_int8(const int8_t *q, const float *scales, int64_t N, int64_t K, float *w) {
    #pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) w[n * K + k] = (float)q[n * K + k] * scales[n];
}

/* int4: w[N, K] in the natural column order (byte b of a row: columns 2b and 2b + 1). */
void lk_dequantize_int4(const uint8_t *packed, const float *scales, const float *zeros,
                        int64_t group_size, int64_t N, int64_t K, float *w) {
    int64_t groups = K / group_size;
    #pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 2 * LANES) {
            const uint8_t *b = packed + n * (K / 2) + k / 2;
            float s = scales[n * groups + k / group_size], z = zeros[n * groups + k / group_size];
            float *out = w + n * K + k;
            for (int l = 0; l < LANES; l++) {
                out[2 * l] = ((float)(b[l] & 15) - z) * s;
                out[2 * l + 1] = ((float)(b[l] >> 4) - z) * s;
            }
        }
}
