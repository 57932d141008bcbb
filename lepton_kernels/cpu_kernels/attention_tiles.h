/* Attention tiles for paged_attention.c: the pieces of one online-softmax step over a tile of
 * KEY_TILE keys, for a few query rows at once (the rows of one work item).
 *   exp_le0        e^x for x <= 0, LANES at a time (the softmax weights e^(s - max))
 *   load_row / store_row   one head row converted float32 <-> float32 / float16 / bfloat16
 *   scores         s[r][j] = <q_r, k_j> for the tile (q pre-scaled by the softmax scale)
 *   accumulate     o_r += sum_j p[r][j] v_j
 * Included by paged_attention.c only (one translation unit); needs quant_simd.h first.
 */
#ifndef LK_ATTENTION_TILES_H
#define LK_ATTENTION_TILES_H

#include <stdint.h>
#include <string.h>

#define KEY_TILE 64   /* keys per online-softmax step (a multiple of LANES) */

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

/* libm's fmaxf is a call (NaN rules) without -ffast-math; these scores are never NaN. */
static inline float maxf(float a, float b) { return a > b ? a : b; }
INLINE void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* e^x for x <= 0 (s - max), LANES at a time, as 2^n e^y: n = round(x log2 e), y = x - n ln 2
 * (ln 2 in two parts, so y is exact to float32 rounding: Cody & Waite), e^y by its degree-7
 * Taylor polynomial on |y| <= 0.35 (truncation < 1e-8): within 2 float32 ulps of e^x. Vector
 * extensions, since libm's expf is a scalar call without -ffast-math. x < -87 (and -inf, a
 * masked score) gives 0: e^x is below float32's normals there. */
INLINE vf exp_le0(vf x) {
    vi32 under = x < splat(-87.f);
    x = (vf)(((vi32)x & ~under) | ((vi32)splat(-87.f) & under));
    vf n = (x * 1.44269504f + 12582912.f) - 12582912.f;   /* round to nearest: 1.5 * 2^23 */
    vf y = x - n * 0.693359375f + n * 2.12194440e-4f;       /* ln 2 = 0.693359375 - 2.12e-4 */
    vf p = splat(1.f / 5040);
    p = p * y + 1.f / 720; p = p * y + 1.f / 120; p = p * y + 1.f / 24;
    p = p * y + 1.f / 6;   p = p * y + 0.5f;      p = p * y + 1.f;     p = p * y + 1.f;
    vf two = (vf)((__builtin_convertvector(n, vi32) + 127) << 23);
    return (vf)((vi32)(p * two) & ~under);
}

/* bfloat16 is the top half of a float32; rounding to it is to nearest even (NaN stays NaN). */
typedef union { float f; uint32_t u; } bits_t;
static inline float bf16_to_f32(uint16_t h) { return (bits_t){.u = (uint32_t)h << 16}.f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = (bits_t){.f = f}.u;
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* dst[0 .. d) = mul * src[off .. off + d), src in dtype dt. */
static void load_row(float *restrict dst, const void *src, int64_t off, int64_t d, int dt,
                     float mul) {
    const float *f = (const float *)src + off;
    const uint16_t *h = (const uint16_t *)src + off;
    if (dt == DT_F32) {
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) dst[i] = mul * f[i];
    } else if (dt == DT_BF16) {
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) dst[i] = mul * bf16_to_f32(h[i]);
    }
#ifdef __FLT16_MAX__
    else {
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) dst[i] = mul * (float)((const _Float16 *)h)[i];
    }
#endif
}

/* dst[off .. off + d) = mul * src[0 .. d), rounded to dtype dt. */
static void store_row(void *dst, int64_t off, const float *restrict src, int64_t d, int dt,
                      float mul) {
    float *f = (float *)dst + off;
    uint16_t *h = (uint16_t *)dst + off;
    if (dt == DT_F32) {
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) f[i] = mul * src[i];
    } else if (dt == DT_BF16) {
        for (int64_t i = 0; i < d; i++) h[i] = f32_to_bf16(mul * src[i]);
    }
#ifdef __FLT16_MAX__
    else {
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) ((_Float16 *)h)[i] = (_Float16)(mul * src[i]);
    }
#endif
}

/* s[r * KEY_TILE + kb] = <q_r, k_kb> for RB query rows (stride d) and KB keys: RB x KB
 * independent accumulators (at most 4 x 2: 8 FMA chains hide the FMA latency and fit 16
 * registers), each key vector loaded once for the RB rows. Called with constant RB and KB, so
 * the small loops unroll and the accumulators stay in registers; d % LANES is summed scalar. */
INLINE void qk_tile(const float *restrict qs, int64_t d, const float *const *kp, float *s,
                    const int RB, const int KB) {
    vf acc[4][2], k[2];
    for (int r = 0; r < RB; r++)
        for (int kb = 0; kb < KB; kb++) acc[r][kb] = splat(0.f);
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES) {
        for (int kb = 0; kb < KB; kb++) k[kb] = load_f(kp[kb] + i);
        for (int r = 0; r < RB; r++) {
            vf qv = load_f(qs + r * d + i);
            for (int kb = 0; kb < KB; kb++) acc[r][kb] += qv * k[kb];
        }
    }
    for (int r = 0; r < RB; r++)
        for (int kb = 0; kb < KB; kb++) {
            float t = hsum(acc[r][kb]);
            for (int64_t j = i; j < d; j++) t += qs[r * d + j] * kp[kb][j];
            s[r * KEY_TILE + kb] = t;
        }
}

/* o_r[i .. i + VB LANES) += sum_jj p[r * KEY_TILE + jj] v_jj[..] for RB rows over nt keys: the
 * slice of o stays in registers across all the keys (RB x VB chains), each value vector is
 * loaded once for the RB rows. */
INLINE void pv_slice(float *restrict o, int64_t d, int64_t i, const float *p,
                     const float *const *vp, int64_t nt, const int RB, const int VB) {
    vf acc[4][2], v[2];
    for (int r = 0; r < RB; r++)
        for (int vb = 0; vb < VB; vb++) acc[r][vb] = load_f(o + r * d + i + vb * LANES);
    for (int64_t jj = 0; jj < nt; jj++) {
        for (int vb = 0; vb < VB; vb++) v[vb] = load_f(vp[jj] + i + vb * LANES);
        for (int r = 0; r < RB; r++) {
            vf wt = bcast(p + r * KEY_TILE + jj);
            for (int vb = 0; vb < VB; vb++) acc[r][vb] += wt * v[vb];
        }
    }
    for (int r = 0; r < RB; r++)
        for (int vb = 0; vb < VB; vb++) store_f(o + r * d + i + vb * LANES, acc[r][vb]);
}

INLINE void pv_tile(float *restrict o, int64_t d, const float *p, const float *const *vp,
                    int64_t nt, const int RB) {
    int64_t i = 0;
    for (; i + 2 * LANES <= d; i += 2 * LANES) pv_slice(o, d, i, p, vp, nt, RB, 2);
    if (i + LANES <= d) pv_slice(o, d, i, p, vp, nt, RB, 1), i += LANES;
    for (; i < d; i++)   /* d % LANES */
        for (int r = 0; r < RB; r++)
            for (int64_t jj = 0; jj < nt; jj++) o[r * d + i] += p[r * KEY_TILE + jj] * vp[jj][i];
}

/* Rows in groups of 4 and a remainder, keys in pairs and a remainder: the constant tile sizes
 * the tile functions are specialized for. */
#define QK_KEYS(RB) do {                                                                       \
        for (jj = 0; jj + 2 <= nt; jj += 2) qk_tile(qr, d, kp + jj, sr + jj, RB, 2);         \
        if (jj < nt) qk_tile(qr, d, kp + jj, sr + jj, RB, 1);                                \
    } while (0)

static void scores(const float *qs, int64_t rows, int64_t d, const float *const *kp, int64_t nt,
                   float *s) {
    for (int64_t r = 0, jj; r < rows; r += 4) {
        const float *qr = qs + r * d;
        float *sr = s + r * KEY_TILE;
        if (rows - r >= 4) QK_KEYS(4); else if (rows - r == 3) QK_KEYS(3);
        else if (rows - r == 2) QK_KEYS(2); else QK_KEYS(1);
    }
}

static void accumulate(float *o, int64_t rows, int64_t d, const float *s, const float *const *vp,
                       int64_t nt) {
    for (int64_t r = 0; r < rows; r += 4) {
        float *orow = o + r * d;
        const float *p = s + r * KEY_TILE;
        if (rows - r >= 4) pv_tile(orow, d, p, vp, nt, 4);
        else if (rows - r == 3) pv_tile(orow, d, p, vp, nt, 3);
        else if (rows - r == 2) pv_tile(orow, d, p, vp, nt, 2);
        else pv_tile(orow, d, p, vp, nt, 1);
    }
}

#endif  /* LK_ATTENTION_TILES_H */
