/* RMSNorm with an optional fused residual add on the CPU, float32, row by row.
 *
 * For each row t of x[T, H] (and residual[T, H] when given):
 *     s[t, i] = x[t, i] (+ residual[t, i])                  float32 add, as the eager spec
 *     r[t]    = 1 / sqrt(sum_i s[t, i]^2 / H + eps)          see "Statistics" below
 *     y[t, i] = (s[t, i] * r[t]) * weight[i]                 float32, the eager spec's order
 * y (and s, with a residual) go to new contiguous [T, H] buffers; the inputs are only read.
 * x and residual may have any row stride (their elements inside a row are contiguous): a
 * column slice of a wider activation needs no copy.
 *
 * Statistics: the squares are summed in double. A float32 square is exact in double (24-bit
 * mantissas -> at most 48 bits), so the only rounding is the sum's, below H * 2^-53 relative,
 * and r[t] rounded to float32 is (almost always) the correctly rounded value of the exact
 * formula. The summation order is fixed in the C (LANES partial sums, folded pairwise), so the
 * result is the same for any vector width -march=native picks and any thread count. The eager
 * spec sums in float32 (torch.mean, a few 2^-24 relative), so the two agree to float32
 * rounding. The conversions to double cost little: measured against float32 partial sums,
 * one thread, ctypes call included, [8, 4096] 8.8 vs 7.4 us without a residual and no
 * difference with one (its extra loads and stores dominate); a decode call is mostly Python.
 *
 * Threads: rows are independent, so OpenMP splits them, but only for large inputs (the `if`
 * clause): starting the team costs microseconds, far more than a decode row's ~0.1 us, and the
 * pool is shared with torch (the same libgomp), so small calls stay on the calling thread.
 * Compiled on first use with the system C compiler (-O3 -march=native -fopenmp) by jit_build.
 */
#include <math.h>
#include <stdint.h>

/* Elements (T * H) from which rows are split over threads: torch's own grain size for
 * elementwise ops (at::internal::GRAIN_SIZE), ~10 us of work here. Measured on 2 idle cores with
 * a residual: [16, 2048] 12.0 -> 8.3 us, [32, 2048] 22.7 -> 14.0 us; below it the gain was small
 * or, on a busy machine, a loss. */
#define PARALLEL_ELEMENTS (1 << 15)

/* Independent partial sums per row. One vector accumulator would chain every add on the
 * previous one (4-cycle latency per 4 doubles: latency-bound at ~1 cycle per element); 32
 * lanes are 8 independent AVX2 chains (4 AVX-512), enough to keep the FMA units busy. The lanes
 * are written out in C and combined in a fixed order, so the rounding of the sum is the same
 * whatever vector width gcc picked. */
#define LANES 32

/* The partial sums folded pairwise (lane j += lane j + width), then the tail's sum added. */
static inline double combine(double acc[LANES], double tail) {
    for (int width = LANES / 2; width > 0; width /= 2)   /* pairwise: lane j += lane j + width */
        for (int j = 0; j < width; j++)
            acc[j] += acc[j + width];
    return acc[0] + tail;
}

/* One row: s = x (+ res) written to s_out when res is given; returns sum(s^2) in double. */
static inline double sum_squares(const float *restrict x, const float *restrict res,
                                 float *restrict s_out, int64_t H) {
    double acc[LANES] = {0}, tail = 0.0;
    int64_t body = H - H % LANES, i = 0;
    if (res != 0) {
        for (; i < body; i += LANES)
#pragma omp simd
            for (int j = 0; j < LANES; j++) {
                float v = x[i + j] + res[i + j];
                s_out[i + j] = v;
                acc[j] += (double)v * (double)v;
            }
        for (; i < H; i++) {
            float v = x[i] + res[i];
            s_out[i] = v;
            tail += (double)v * (double)v;
        }
    } else {
        for (; i < body; i += LANES)
#pragma omp simd
            for (int j = 0; j < LANES; j++)
                acc[j] += (double)x[i + j] * (double)x[i + j];
        for (; i < H; i++)
            tail += (double)x[i] * (double)x[i];
    }
    return combine(acc, tail);
}

/* One row: y = (s * r) * w. */
static inline void scale_row(const float *restrict s, float r, const float *restrict w,
                             float *restrict y, int64_t H) {
#pragma omp simd
    for (int64_t i = 0; i < H; i++)
        y[i] = (s[i] * r) * w[i];
}

/* x[T, H] with row stride x_stride (elements); res NULL or [T, H] with row stride res_stride;
 * w[H]; y[T, H] contiguous; s_out[T, H] contiguous (only written, and only needed, with res). */
void lk_rms_norm_f32(const float *x, int64_t x_stride, const float *res, int64_t res_stride,
                     const float *w, float *y, float *s_out, int64_t T, int64_t H, double eps) {
    if (T <= 0 || H <= 0)
        return;
#pragma omp parallel for schedule(static) if (T > 1 && T * H >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        const float *rt = res != 0 ? res + t * res_stride : 0;
        float *st = res != 0 ? s_out + t * H : 0;
        double ss = sum_squares(xt, rt, st, H);
        /* The mean and eps in double, then rounded once to the float32 factor (see the top). */
        float r = (float)(1.0 / sqrt(ss / (double)H + eps));
        scale_row(res != 0 ? st : xt, r, w, y + t * H, H);
    }
}
