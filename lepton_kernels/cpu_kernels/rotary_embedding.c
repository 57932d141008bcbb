/* Rotary position embedding (RoPE) on the CPU, in place on q and k, float32.
 *
 * For token t at position p = positions[t], row p of cos_sin_cache is [cos_0..cos_{h-1} |
 * sin_0..sin_{h-1}] with h = rot_dim / 2. Every head x of q[t] and k[t] has its pairs rotated
 *     (x1, x2) -> (x1 cos_i - x2 sin_i,  x2 cos_i + x1 sin_i),   i < h,
 * the pairs being (x[i], x[i + h]) for neox (Llama, Qwen, Mistral) and (x[2i], x[2i + 1]) for the
 * interleaved layout (GPT-J). Elements rot_dim..head_dim are neither read nor written (partial
 * rotary). q and k are addressed through their element strides for tokens and heads (views of
 * a fused qkv buffer); head_dim is contiguous (the caller checks).
 *
 * Rounding: each product is rounded to float32, then the sum: exactly what the eager spec's
 * separate tensor ops compute, so the results are the same bits. That needs the compiler not to
 * fuse a * b - c * d into an FMA (gcc's default for GNU C with -march=native), hence the pragmas.
 *
 * Positions are checked (0 <= p < max_position) before anything is written: on a bad one the
 * call returns 1 with q and k untouched, and the caller raises the spec's own error.
 */
#include <stdint.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* From this many rotated pairs per call the tokens are split over threads. One thread does
 * ~3 pairs a nanosecond (2-core AVX2 VM); waking the pool costs a few microseconds and torch's
 * pool is shared with the matmuls around this op. Measured there, 1 vs 2 threads, whole call:
 * 10240 pairs 6.9 / 6.0 us, 20480 9.8 / 7.3, 40960 17.4 / 10.7; a decode step has a few hundred. */
#define PARALLEL_PAIRS 16384

/* neox: x1 = x[0..h), x2 = x[h..2h): disjoint halves, so restrict holds and gcc vectorizes
 * without an overlap check. */
static inline void rotate_halves(float *restrict x1, float *restrict x2, const float *restrict cos,
                                 const float *restrict sin, int64_t h) {
    #pragma omp simd
    for (int64_t i = 0; i < h; i++) {
        float a = x1[i], b = x2[i];
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
    }
}

/* Interleaved: pairs (x[2i], x[2i + 1]); gcc vectorizes the stride-2 accesses with shuffles. */
static inline void rotate_pairs(float *restrict x, const float *restrict cos,
                                const float *restrict sin, int64_t h) {
    #pragma omp simd
    for (int64_t i = 0; i < h; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cos[i] - b * sin[i];
        x[2 * i + 1] = b * cos[i] + a * sin[i];
    }
}

static inline int64_t position(const void *positions, int64_t stride, int is_int64, int64_t t) {
    return is_int64 ? ((const int64_t *)positions)[t * stride]
                    : (int64_t)((const int32_t *)positions)[t * stride];
}

/* The arguments, one int64 each (pointers as addresses), in one block: ctypes converts a
 * single pointer argument in a fraction of the time it takes for seventeen, which was a third
 * of a decode step's call. */
enum { POSITIONS, POS_STRIDE, IS_INT64, TOKENS, Q, Q_TOK, Q_HEAD, HQ, K, K_TOK, K_HEAD, HK,
       CACHE, CACHE_ROW, MAX_POSITION, ROT_DIM, IS_NEOX, N_ARGS };

/* positions[T] (int64 if is_int64, else int32; element stride pos_stride);
 * q: T x hq heads at element strides (q_tok, q_head), head_dim contiguous; k likewise;
 * cache: max_position rows of rot_dim floats, row stride cache_row, columns contiguous.
 * Returns 0, or 1 (nothing written) when a position lies outside [0, max_position). */
int lk_rotary_embedding(const int64_t *a) {
    const void *positions = (const void *)(intptr_t)a[POSITIONS];
    const int64_t pos_stride = a[POS_STRIDE], T = a[TOKENS], max_position = a[MAX_POSITION];
    const int is_int64 = (int)a[IS_INT64], is_neox = (int)a[IS_NEOX];
    float *q = (float *)(intptr_t)a[Q], *k = (float *)(intptr_t)a[K];
    const int64_t q_tok = a[Q_TOK], q_head = a[Q_HEAD], hq = a[HQ];
    const int64_t k_tok = a[K_TOK], k_head = a[K_HEAD], hk = a[HK];
    const float *cache = (const float *)(intptr_t)a[CACHE];
    const int64_t cache_row = a[CACHE_ROW], h = a[ROT_DIM] / 2;
    /* First pass reads only: a bad position must leave q and k as they were. Unsigned compare
     * catches negatives too. */
    for (int64_t t = 0; t < T; t++)
        if ((uint64_t)position(positions, pos_stride, is_int64, t) >= (uint64_t)max_position)
            return 1;
    #pragma omp parallel for schedule(static) if (T * (hq + hk) * h >= PARALLEL_PAIRS)
    for (int64_t t = 0; t < T; t++) {
        const float *cos = cache + position(positions, pos_stride, is_int64, t) * cache_row;
        const float *sin = cos + h;
        for (int64_t j = 0; j < hq + hk; j++) {
            /* q's heads, then k's: one loop so a token's cos/sin row is read once for both */
            float *x = j < hq ? q + t * q_tok + j * q_head : k + t * k_tok + (j - hq) * k_head;
            if (is_neox)
                rotate_halves(x, x + h, cos, sin, h);
            else
                rotate_pairs(x, cos, sin, h);
        }
    }
    return 0;
}

/* N_ARGS, for the caller to check its packing against. */
int lk_rotary_embedding_nargs(void) { return N_ARGS; }
