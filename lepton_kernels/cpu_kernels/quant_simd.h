/* SIMD helpers of the CPU quant_matmul kernels (quant_gemm.c includes this file; it is one
 * translation unit, compiled on first use for the host CPU): the vector width and tile sizes of
 * the target, loads, conversions of packed weights to float vectors, lane sums. */
#ifndef LEPTON_QUANT_SIMD_H
#define LEPTON_QUANT_SIMD_H
#include <stdint.h>
#include <string.h>

/* LANES floats per vector, the widest the target has; each tile keeps MB * NB accumulators plus
 * NB dequantized weight vectors and one x vector in registers, so its size follows the register
 * file: 32 vector registers on AVX-512 (4 x 4 tiles), 16 on AVX2 and SSE (6 x 2: twelve
 * accumulators; each weight vector, converted once, feeds six rows of x, which pays for the
 * conversion). Decode tiles are 1 x 8 everywhere: eight independent FMA chains. */
#if defined(__AVX512F__)
#define LANES 16
#define TILE_MB 4
#define TILE_NB 4
#define DECODE_NB4 8   /* int4 decode tile: two accumulators per row (group, total) */
#elif defined(__AVX__)
#define LANES 8
#define TILE_MB 6
#define TILE_NB 2
#define DECODE_NB4 4
#else
#define LANES 4
#define TILE_MB 6
#define TILE_NB 2
#define DECODE_NB4 4
#endif
#define N_BLOCK 8    /* output rows per thread work item */
#define BLOCK_K 32   /* int4: inputs per block of 16 packed bytes */
/* Tile arrays are sized for the largest tile (a variable size would make them VLAs, kept on
 * the stack); inlined with constant MB and NB, the unused entries vanish. */
#define MB_MAX 6
#define NB_MAX 8

/* GCC/Clang vector extensions, lowered to AVX-512, AVX2, SSE or NEON, whatever -march gives. */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef uint8_t vu8 __attribute__((vector_size(LANES)));
typedef int32_t vi32 __attribute__((vector_size(4 * LANES)));

#define INLINE static inline __attribute__((always_inline))

INLINE vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE vf splat(float s) { return (vf){0} + s; }
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__AVX__)
#include <immintrin.h>
#endif
/* The lanes' sum as a tree of adds: a lane-by-lane loop is a serial chain of LANES adds and
 * shuffles, which gcc may not reorder; per 6 x 2 tile it cost as much as a third of its FMAs. */
#if defined(__AVX512F__)
INLINE float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX__)
INLINE float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
INLINE float hsum(vf v) { float s = 0.f; for (int l = 0; l < LANES; l++) s += v[l]; return s; }
#endif
/* Pins v to a register. Without it gcc folds each use of a loaded x vector into an FMA's
 * memory operand, loading it once per use (NB times): 14 loads per 12 FMAs in a 6 x 2 tile,
 * more than the two 256-bit loads per cycle a core issues, so the tile ran load-bound. */
#define IN_REG(v) __asm__("" : "+x"(v))
/* LANES bytes, zero-extended to int32 lanes. gcc 12 lowers the generic conversion of a vector
 * narrower than 16 bytes one lane at a time, so x86 gets the instruction itself. */
#if defined(__AVX512F__)
INLINE vi32 widen_u8(const uint8_t *p) { return (vi32)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
#elif defined(__AVX2__)
INLINE vi32 widen_u8(const uint8_t *p) { return (vi32)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
#else
INLINE vi32 widen_u8(const uint8_t *p) {
    vu8 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, vi32);
}
#endif
/* LANES packed bytes -> their low and high nibbles as floats (the shift on int32 lanes: x86 has
 * no byte shift). */
INLINE void nibbles_to_f(const uint8_t *p, vf *lo, vf *hi) {
    vi32 wide = widen_u8(p);
    *lo = __builtin_convertvector(wide & 15, vf);
    *hi = __builtin_convertvector(wide >> 4, vf);
}
/* LANES int8 -> float (gcc 12 lowers the generic sign extension one lane at a time). */
#if defined(__AVX512F__)
INLINE vf int8_to_f(const int8_t *p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
INLINE vf int8_to_f(const int8_t *p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
/* Portable: the bytes widened unsigned, then 256 taken off the negative ones (exact). */
INLINE vf int8_to_f(const int8_t *p) {
    vi32 u = widen_u8((const uint8_t *)p);
    return __builtin_convertvector(u - ((u >> 7) << 8), vf);
}
#endif

/* *p in every lane, one load (a splat of a float value costs gcc an add and a shuffle). */
#if defined(__AVX512F__)
INLINE vf bcast(const float *p) { return (vf)_mm512_set1_ps(*p); }
#elif defined(__AVX__)
INLINE vf bcast(const float *p) { return (vf)_mm256_broadcast_ss(p); }
#else
INLINE vf bcast(const float *p) { return splat(*p); }
#endif
#endif
