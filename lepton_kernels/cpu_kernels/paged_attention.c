/* Paged attention on the CPU: the new tokens of each sequence against its paged KV cache.
 *
 * Sequence b owns n = seq_lens[b] cached tokens; position j sits in block table[b, j / BS],
 * row j % BS of k_cache / v_cache [num_blocks, BS, Hk, D]. Its q_len = cu[b+1] - cu[b] new
 * queries (rows cu[b] .. of q [T, Hq, D]) are its LAST positions p_i = n - q_len + i, and query
 * head h reads kv head g = h / G, G = Hq / Hk (bottom-right aligned causal attention):
 *     s_ij = scale * <q_ih, k_jg>   for j in [lo_i, p_i],  lo_i = max(0, p_i - W + 1) with a
 *                                   sliding window W, else 0
 *     out_ih = sum_j e^(s_ij - max_j s_ij) v_jg / sum_j e^(s_ij - max_j s_ij)
 * in float32 with the online softmax (Milakov & Gimelshein 2018): keys in tiles of KEY_TILE,
 * per query row a running max m, sum l and unnormalized output o; a tile with max t gives
 * m' = max(m, t), l' = l e^(m - m') + sum_j e^(s_j - m'),
 * o' = o e^(m - m') + sum_j e^(s_j - m') v_j, and the result is o / l.
 *
 * A work item is (up to QT = MAX_ROWS / G of a sequence's new tokens, kv head g): its rows share
 * each pass over the keys, so every K/V row is fetched from memory once for all of them (decode:
 * the G heads of one token). K/V rows are read in place through the block table (no gather
 * copy), and only positions the sequence owns: table entries past its last block and blocks of
 * other sequences (possibly never written: NaN) are never read. float16 / bfloat16 K/V are
 * converted a tile at a time into float scratch, q once per item; the output is rounded once
 * to the input dtype. Items run under OpenMP (the runtime torch loaded) only when the call does
 * enough work to pay for waking the threads. The index tensors are checked first, by the eager
 * spec's deep-check rules; on a violation nothing is written and LK_BAD_INPUT is returned.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_simd.h"   /* LANES, vf / vi32 (vector extensions), load_f, splat, bcast, hsum */
#include "attention_tiles.h"   /* KEY_TILE, dtypes, exp_le0, load/store_row, scores, accumulate */

#define MAX_ROWS 32   /* query rows (tokens x heads) sharing a pass over the keys */
/* Below this many multiply-adds (q rows x visible keys x D, summed; ~7 us on one core) the call
 * stays on the calling thread. Measured (2-core VM, Hq 8, Hk 2, D 64, one decode token): a
 * parallel region costs ~0.5 us with the pool spinning, ~3 us waking it from sleep, and far
 * more when other processes hold the cores; 100 keys (51k) ran 7.0 -> 4.5 us warm. */
#define PAR_WORK 131072

enum { LK_OK = 0, LK_BAD_INPUT = 1, LK_NO_MEMORY = 2, LK_NO_DTYPE = 3 };

#ifdef __FLT16_MAX__
int lk_paged_attention_has_f16(void) { return 1; }
#else
int lk_paged_attention_has_f16(void) { return 0; }
#endif

/* The arguments, packed by the caller into one buffer of 8-byte fields (pointers as integers):
 * ctypes converts one argument in a fraction of a microsecond, 23 separate ones in ~3 us. */
typedef struct {
    int64_t q, q_st, q_sh;                 /* q [T, Hq, D]: token and head strides, D dense */
    int64_t k_cache, v_cache, num_blocks, bs, hk, d;
    int64_t table, table_st, max_blocks;   /* block_tables [B, max_blocks], rows table_st apart */
    int64_t seq_lens, cu, batch, total, hq, max_q, max_k;
    double scale;
    int64_t window, dt, out;               /* window 0 = none; out [T, Hq, D] dense, dtype dt */
} args_t;

typedef struct {   /* one thread's scratch for items of up to `rows` query rows */
    float *qs, *o, *s, *m, *l, *kt, *vt;
    const float *kp[KEY_TILE], *vp[KEY_TILE];
} scratch_t;

/* Points w's arrays into base (NULL w: only sizes); returns the floats they take. */
static size_t scratch_carve(scratch_t *w, float *base, int64_t rows, int64_t d) {
    if (w) {
        w->qs = base, w->o = w->qs + rows * d, w->s = w->o + rows * d, w->m = w->s + rows * KEY_TILE;
        w->l = w->m + rows, w->kt = w->l + rows, w->vt = w->kt + KEY_TILE * d;
    }
    return 2 * rows * d + rows * KEY_TILE + 2 * rows + 2 * KEY_TILE * d;
}

#define PTR(x) ((void *)(intptr_t)(x))

/* Tokens i0 .. i0 + nq - 1 of sequence b's new ones, kv head g. */
static void attend(const args_t *a, scratch_t *w, int64_t b, int64_t i0, int64_t nq, int64_t g) {
    const int32_t *cu = PTR(a->cu), *seq_lens = PTR(a->seq_lens);
    const int32_t *table = (const int32_t *)PTR(a->table) + b * a->table_st;
    const int64_t d = a->d, G = a->hq / a->hk, rows = nq * G, dt = a->dt;
    const int64_t tok0 = cu[b] + i0, p0 = seq_lens[b] - (cu[b + 1] - cu[b]) + i0;
    float *restrict qs = w->qs, *restrict o = w->o, *restrict s = w->s, *m = w->m, *l = w->l;
    vi32 iota;
    for (int i = 0; i < LANES; i++) iota[i] = i;
    for (int64_t r = 0; r < rows; r++) {   /* row r: token tok0 + r / G, head g G + r % G */
        int64_t off = (tok0 + r / G) * a->q_st + (g * G + r % G) * a->q_sh;
        load_row(qs + r * d, PTR(a->q), off, d, dt, (float)a->scale);
        memset(o + r * d, 0, d * sizeof(float));
        m[r] = -INFINITY, l[r] = 0.f;
    }
    /* The item's keys: from its first token's window start to its last token. */
    int64_t kend = p0 + nq, kbeg = a->window && p0 - a->window + 1 > 0 ? p0 - a->window + 1 : 0;
    for (int64_t j0 = kbeg; j0 < kend; j0 += KEY_TILE) {
        int64_t nt = kend - j0 < KEY_TILE ? kend - j0 : KEY_TILE;
        for (int64_t jj = 0; jj < nt; jj++) {
            int64_t pos = j0 + jj;
            int64_t off = ((table[pos / a->bs] * a->bs + pos % a->bs) * a->hk + g) * d;
            if (dt == DT_F32) {
                w->kp[jj] = (const float *)PTR(a->k_cache) + off;
                w->vp[jj] = (const float *)PTR(a->v_cache) + off;
            } else {   /* converted once here, then read by every row */
                load_row(w->kt + jj * d, PTR(a->k_cache), off, d, dt, 1.f);
                load_row(w->vt + jj * d, PTR(a->v_cache), off, d, dt, 1.f);
                w->kp[jj] = w->kt + jj * d, w->vp[jj] = w->vt + jj * d;
            }
        }
        scores(qs, rows, d, w->kp, nt, s);
        /* Online softmax per row over its visible keys of the tile, jj in [lo, hi) (causal and
         * window mask); s becomes the weights, 0 outside. The vector loop runs up to a whole
         * vector past nt (s rows are KEY_TILE long): those lanes are masked too. */
        const int64_t ntv = (nt + LANES - 1) / LANES * LANES;
        for (int64_t r = 0; r < rows; r++) {
            int64_t p = p0 + r / G, first = a->window ? p - a->window + 1 : 0;
            int64_t lo = first > j0 ? first - j0 : 0, hi = p - j0 + 1 < nt ? p - j0 + 1 : nt;
            float *restrict sr = s + r * KEY_TILE, tmax = -INFINITY;
            if (lo >= hi) {   /* nothing visible in this tile: weights 0, state unchanged */
                memset(sr, 0, ntv * sizeof(float));
                continue;
            }
            #pragma omp simd reduction(max : tmax)
            for (int64_t jj = lo; jj < hi; jj++) tmax = maxf(tmax, sr[jj]);
            float mnew = maxf(m[r], tmax), alpha = exp_le0(splat(m[r] - mnew))[0];
            vf sum = splat(0.f);
            for (int64_t jj = 0; jj < ntv; jj += LANES) {
                vi32 idx = iota + (int32_t)jj, visible = (idx >= (int32_t)lo) & (idx < (int32_t)hi);
                vf wt = (vf)((vi32)exp_le0(load_f(sr + jj) - mnew) & visible);
                store_f(sr + jj, wt);
                sum += wt;
            }
            l[r] = l[r] * alpha + hsum(sum), m[r] = mnew;
            if (alpha != 1.f) {
                #pragma omp simd
                for (int64_t i = 0; i < d; i++) o[r * d + i] *= alpha;
            }
        }
        accumulate(o, rows, d, s, w->vp, nt);
    }
    for (int64_t r = 0; r < rows; r++) {   /* every row saw its own position: l >= 1 */
        int64_t off = ((tok0 + r / G) * a->hq + g * G + r % G) * d;
        store_row(PTR(a->out), off, o + r * d, d, dt, 1.f / l[r]);
    }
}

/* Item it: chunk it / Hk (sequence, first new token), kv head it % Hk. */
static void run_item(const args_t *a, scratch_t *w, const int64_t *chunk, int64_t qt, int64_t it) {
    const int32_t *cu = PTR(a->cu);
    int64_t b = chunk[2 * (it / a->hk)], i0 = chunk[2 * (it / a->hk) + 1];
    int64_t left = cu[b + 1] - cu[b] - i0;
    attend(a, w, b, i0, left < qt ? left : qt, it % a->hk);
}

/* Returns LK_OK, or LK_BAD_INPUT / LK_NO_MEMORY / LK_NO_DTYPE having computed nothing. */
int lk_paged_attention(const void *packed) {
    args_t a;
    memcpy(&a, packed, sizeof a);   /* no alignment assumed of the caller's buffer */
#ifndef __FLT16_MAX__
    if (a.dt == DT_F16) return LK_NO_DTYPE;
#endif
    const int32_t *cu = PTR(a.cu), *seq_lens = PTR(a.seq_lens), *table = PTR(a.table);
    /* The eager spec's deep check: cu_seqlens_q 0 .. T non-decreasing with q_len <= max_q,
     * q_len <= seq_len <= min(max_blocks BS, max_k), the table entries in use are blocks. */
    if (cu[0] != 0 || cu[a.batch] != a.total) return LK_BAD_INPUT;
    const int64_t group = a.hq / a.hk, qt = group >= MAX_ROWS ? 1 : MAX_ROWS / group;
    const int64_t cap = a.max_blocks * a.bs < a.max_k ? a.max_blocks * a.bs : a.max_k;
    int64_t chunks = 0, work = 0, longest = 0;
    for (int64_t b = 0; b < a.batch; b++)
        if (cu[b + 1] < cu[b] || cu[b + 1] - cu[b] > a.max_q) return LK_BAD_INPUT;
    for (int64_t b = 0; b < a.batch; b++) {
        int64_t ql = cu[b + 1] - cu[b], n = seq_lens[b];
        if (n < ql || n > cap) return LK_BAD_INPUT;
        for (const int32_t *e = table + b * a.table_st, *end = e + (n + a.bs - 1) / a.bs; e < end; e++)
            if (*e < 0 || *e >= a.num_blocks) return LK_BAD_INPUT;
        chunks += (ql + qt - 1) / qt;
        work += ql * (a.window && a.window < n ? a.window + qt : n);
        longest = ql > longest ? ql : longest;
    }
    if (chunks == 0) return LK_OK;
    int64_t *chunk = malloc(2 * chunks * sizeof(int64_t));   /* (sequence, first new token) */
    if (!chunk) return LK_NO_MEMORY;
    for (int64_t b = 0, c = 0; b < a.batch; b++)
        for (int64_t i = 0; i < cu[b + 1] - cu[b]; i += qt, c++)
            chunk[2 * c] = b, chunk[2 * c + 1] = i;
    const int64_t items = chunks * a.hk, rows = (longest < qt ? longest : qt) * group;
    const int par = items > 1 && work * a.hq * a.d > PAR_WORK;
    const int threads = par ? omp_get_max_threads() : 1;
    const size_t per_thread = scratch_carve(NULL, NULL, rows, a.d);
    float *scratch = malloc(threads * per_thread * sizeof(float));
    if (scratch && par) {
        #pragma omp parallel num_threads(threads)
        {
            scratch_t w;
            scratch_carve(&w, scratch + omp_get_thread_num() * per_thread, rows, a.d);
            /* Items differ in length (q_len, context): handed out one at a time. */
            #pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) run_item(&a, &w, chunk, qt, it);
        }
    } else if (scratch) {   /* no parallel region at all: even an inactive one sets up a team */
        scratch_t w;
        scratch_carve(&w, scratch, rows, a.d);
        for (int64_t it = 0; it < items; it++) run_item(&a, &w, chunk, qt, it);
    }
    const int ok = scratch != NULL;
    free(scratch), free(chunk);
    return ok ? LK_OK : LK_NO_MEMORY;
}
