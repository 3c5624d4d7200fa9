/* pocketlm CPU kernels: 4-, 6- and 8-bit weights times 8-bit activations, with integer dot products.
 *
 * Loaded with ctypes by pocketlm/quant/kernels.py, which compiles this file on first use with the machine's C
 * compiler (-O3 -march=native -pthread) into a per-user cache. No Python API is used here.
 *
 * Weights are repacked from GGUF blocks into tiles of 16 output rows (lossless: the same 4-bit codes and f16
 * scales, transposed), so that one 512-bit register holds 4 consecutive weights of 16 rows and an integer dot
 * product instruction (AVX512-VNNI vpdpbusd: u8 x s8 -> s32) advances all 16 rows at once against a
 * broadcast group of 4 activations. Per tile and per 32-column block b the layout is:
 *
 *   Q4 (Q4_0, Q4_1):  nib[4][16][4] bytes (256)   byte (c, r, i): low nibble  = code of row r, column 4c+i,
 *                                                                 high nibble = code of row r, column 16+4c+i
 *                     d[16]   f16 (32 bytes)     scale of row r
 *                     m[16]   f16 (32 bytes)     Q4_1 only: offset of row r  (w = d*q + m)
 *   Q8 (Q8_0):        q[8][16][4] bytes (512)    code + 128 (u8) of row r, column 4c+i
 *                     d[16]   f16 (32 bytes)
 *   Q5 (Q5_0, Q5_1):  nib[4][16][4] bytes (256)   low 4 bits of the codes, as Q4
 *                     hb[16][4] bytes (64)       byte (r, i) bit k: fifth bit of row r, column 4k+i (k < 4: the
 *                                                low-nibble register k, k >= 4: the high-nibble register k-4)
 *                     d[16], (Q5_1: m[16]) f16   Q5_0: w = d*(q-16); Q5_1: w = d*q + m
 *   IQ4_NL:           as Q4_0 (nib, d): w = d * kvalues_iq4nl[q], the 16-entry int8 table looked up in registers
 *                     (AVX512: table + 128 as u8 with vpdpbusd and a -128*sum a correction; AVX2: signed values
 *                     with maddubs(|w|, sign(a, w)), as llama.cpp's ggml_vec_dot_iq4_nl_q8_0)
 *
 * Codes are unsigned (Q4: 0..15, Q8: 0..255 after +128), activations signed int8 in blocks of 32 with one
 * scale each (llama.cpp's q8_0/q8_1), so a block's exact integer dot product is
 *   Q4_0: sum (q-8)*a   = sum q*a - 8*sum a       Q8_0: sum (q-128)*a = sum q*a - 128*sum a
 *   Q4_1, Q5_1: d*da*sum q*a + m*sa               (sa = da*sum a rounded to f16, as llama.cpp's q8_1)
 *   Q5_0: sum (q-16)*a = sum q*a - 16*sum a        IQ4_NL: sum kvalues_iq4nl[q]*a
 * The "- k*sum a" correction is the initial value of the integer accumulator.
 *
 * Activation quantization follows llama.cpp's x86 quantize_row_q8_0/q8_1: d = amax/127 stored as f16,
 * q = round-half-even(x * 127/amax).
 *
 * K-quants (Q4_K, Q6_K: super-blocks of 256 columns) use the same 16-row tiles, per tile and super-block:
 *
 *   Q4_K (2368 B):  nib[8][4][16][4] (2048)   sub-block j of 32 columns laid out as a Q4 block above
 *                   sc[8][16] u8, mn[8][16] u8  6-bit scale and min of sub-block j, row r (unpacked from 12 B)
 *                   d[16] f16, dmin[16] f16     w = d*sc*q - dmin*mn
 *   Q6_K (3360 B):  nib[8][4][16][4] (2048)   low 4 bits of the codes, as Q4_K
 *                   hb[8][2][16][4] (1024)     high 2 bits: byte (j, h, r, i) holds, at bits 2c..2c+1, those of
 *                                              column 16h+4c+i of row r (the register of nibble half h, group c)
 *                   sc[16][16] i8 (256)        scale of 16-column group g, row r
 *                   d[16] f16                  w = d*sc*(q - 32)
 *
 * (as many bytes as the GGUF blocks, plus 64 per Q4_K tile block for the unpacked scales.) Their activations are
 * llama.cpp's q8_K (quantize_row_q8_K_ref, which its x86 build uses): per 256 values, iscale = -127/max with max
 * the signed value of largest magnitude, q = min(127, round-half-even(iscale*x)), d = 1/iscale (float), and the
 * sums of each 16 codes (bsums). The integer arithmetic is llama.cpp's ggml_vec_dot_q4_K_q8_K / q6_K_q8_K:
 *   Q4_K: sumi = sum_j sc_j * dot_j (int32),  msum = sum_j mn_j * (bsum_2j + bsum_2j+1),
 *         y += (d*yd)*sumi - (dmin*yd)*msum
 *   Q6_K: sumi = sum_g sc_g * (dot_g - 32*bsum_g) (int32),  y += (d*yd)*sumi
 *
 * Entry points (all row-major, T tokens, K input features, N output features = 16 * tiles):
 *   pl_quantize_act(x, T, K, qa, da, sa_i, sa_f)        x float (T,K) -> qa int8 (T,K), da/sa_f float (T,K/32),
 *                                                        sa_i int32 (T,K/32)
 *   pl_quantize_act_k(x, T, K, qa, d, bs)               q8_K: qa int8 (T,K), d float (T,K/256), bs int16 (T,K/16)
 *   pl_gemm(kind, w, tiles, K, qa, da, sa_i, sa_f, T, y, ldy)   y float (T, ldy), columns [0, 16*tiles)
 *   pl_set_threads(n), pl_get_threads(), pl_isa()
 *   pl_set_prefetch(bytes), pl_get_prefetch()          the K-quant kernels' software prefetch distance (0: off)
 *   pl_mat_check(mat) -> 0 / -1                         a decode-step matrix, e.g. one of KIND_PARTS (row blocks of
 *                                                        different kinds, see "matrices made of row blocks" below)
 *   pl_read_bandwidth(buf, bytes, reps) -> checksum      for the roofline measurement
 *   pl_decode_token(model, head, token, pos, lo, cos, sin, flags)   one decoded token, embedding to logits/argmax
 *   pl_embed_row(table, type, tiles, cols, row, out)     one embedding row as pl_decode_token reads it
 *   pl_argmax_rows(x, B, V, ld, out)                     torch.argmax of each of B rows (greedy picks of a batch)
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else  /* e.g. aarch64: the plain-C paths only */
#define cpu_relax() ((void)0)
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>

#define QK 32
#define TILE 16
#define QKK 256
enum { KIND_Q4_0 = 0, KIND_Q4_1 = 1, KIND_Q8_0 = 2, KIND_Q4_K = 3, KIND_Q6_K = 4, KIND_Q5_K = 5, KIND_Q5_0 = 6,
       KIND_Q5_1 = 7, KIND_IQ4_NL = 8 };
static const int8_t IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
/* an unaligned, aliasing int32 load: `_mm512_set1_epi32(a4[c])` through it compiles to one vpbroadcastd from
 * memory (a load-port op); a memcpy to an int32 array made GCC load 64-bit pairs and shift/move/broadcast
 * them on the vector ALUs, next to the vpdpbusd they feed (the batched decode GEMM ran at ~40% of peak) */
typedef int32_t __attribute__((may_alias, aligned(1))) pl_i32u;
static int is_q5(int kind) { return kind == KIND_Q5_0 || kind == KIND_Q5_1; }
static int has_m(int kind) { return kind == KIND_Q4_1 || kind == KIND_Q5_1; }
/* 32-column kinds: byte offset of d in a tile block (m follows it), and the integer correction k of "- k*sum a" */
static size_t d_off(int kind) { return kind == KIND_Q8_0 ? 512 : (is_q5(kind) ? 320 : 256); }
static int corr_k(int kind) {
    return kind == KIND_Q8_0 ? 128 : (kind == KIND_Q4_0 ? 8 : (kind == KIND_Q5_0 ? 16 : 0));
}
static int is_k(int kind) { return kind == KIND_Q4_K || kind == KIND_Q6_K || kind == KIND_Q5_K; }

/* ---- threads: a pool whose jobs never wait for an idle thread -------------------------------------------------
 *
 * A job is n chunks. The caller publishes it, wakes the workers and claims chunks itself; every thread takes
 * the next chunk with one compare-and-swap on a word holding (job generation << 32 | next chunk), so a chunk
 * is run exactly once and a thread that arrives late (preempted, still asleep) finds nothing left and claims
 * nothing. The caller returns when all chunks are done: it only ever waits for chunks already running, never
 * for a thread to show up. (A fork-join runtime such as OpenMP waits at its barrier for every thread; on a
 * busy 2-core machine that costs a scheduler time slice, ~4-8 ms, per parallel region.) Job parameters live
 * in a ring of 4 slots indexed by generation, so a stale reader sees its own job's (already finished) slot.
 * Idle workers spin briefly, then sleep on a futex. */
typedef void (*task_fn)(void *ctx, int chunk);
typedef struct { task_fn fn; void *ctx; int n; _Atomic int done; } job_t;
#define MAX_THREADS 64
static job_t g_jobs[4];
static _Atomic uint64_t g_word;        /* (generation << 32) | next chunk */
static _Atomic int g_seq;              /* futex word: bumped on every publish */
static _Atomic int g_sleepers;
static int g_threads = 1, g_workers = 0;
static uint32_t g_gen = 0;             /* caller side only */
static pthread_mutex_t g_pool_lock = PTHREAD_MUTEX_INITIALIZER;

static int claim(uint32_t gen) {
    uint64_t w = atomic_load_explicit(&g_word, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(w >> 32) != gen) return -1;
        const int c = (int)(uint32_t)w;
        if (c >= g_jobs[gen & 3].n) return -1;
        if (atomic_compare_exchange_weak_explicit(&g_word, &w, w + 1, memory_order_acq_rel, memory_order_acquire))
            return c;
    }
}

static void run_claimed(uint32_t gen) {
    job_t *j = &g_jobs[gen & 3];
    int c;
    while ((c = claim(gen)) >= 0) {
        j->fn(j->ctx, c);
        atomic_fetch_add_explicit(&j->done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&g_word) >> 32);
    for (;;) {
        int spins = 0;
        uint32_t gen;
        for (;;) {
            const int seq = atomic_load_explicit(&g_seq, memory_order_acquire);
            gen = (uint32_t)(atomic_load_explicit(&g_word, memory_order_acquire) >> 32);
            if (gen != seen) break;
            if (++spins < 20000) { cpu_relax(); continue; }
            atomic_fetch_add(&g_sleepers, 1);
            if ((uint32_t)(atomic_load(&g_word) >> 32) == seen)
                syscall(SYS_futex, &g_seq, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
            atomic_fetch_sub(&g_sleepers, 1);
            spins = 0;
        }
        seen = gen;
        run_claimed(gen);
    }
    return NULL;
}

void pl_set_threads(int n) {
    n = n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
    pthread_mutex_lock(&g_pool_lock);
    while (g_workers < n - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker_main, NULL) != 0) { pthread_attr_destroy(&attr); break; }
        pthread_attr_destroy(&attr);
        g_workers++;
    }
    g_threads = n;
    pthread_mutex_unlock(&g_pool_lock);
}
int pl_get_threads(void) { return g_threads; }

/* Run fn(ctx, 0..n-1), in parallel when threads and chunks allow. Not reentrant: one caller at a time
 * (the Python side calls with the GIL held). */
static void parallel_run(task_fn fn, void *ctx, int n) {
    if (n <= 0) return;
    if (g_threads <= 1 || g_workers == 0 || n == 1) {
        for (int c = 0; c < n; c++) fn(ctx, c);
        return;
    }
    const uint32_t gen = ++g_gen;
    job_t *j = &g_jobs[gen & 3];
    j->fn = fn; j->ctx = ctx; j->n = n;
    atomic_store_explicit(&j->done, 0, memory_order_relaxed);
    atomic_store_explicit(&g_word, (uint64_t)gen << 32, memory_order_release);
    atomic_fetch_add_explicit(&g_seq, 1, memory_order_release);
    if (atomic_load(&g_sleepers) > 0) syscall(SYS_futex, &g_seq, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
    run_claimed(gen);
    int spins = 0;
    while (atomic_load_explicit(&j->done, memory_order_acquire) < n) {
        if (++spins < 2000) cpu_relax();
        else sched_yield();  /* a preempted worker holds a chunk: give it this core */
    }
}

/* fn(ctx, 0..n-1) for n independent rows, in runs of consecutive rows per chunk: a row's element-wise work (a
 * norm, a residual, its activation codes) is ~0.1-1 us, less than two threads handing a claim word back and forth
 * for every row costs; ~16 chunks a thread keep the load balance. Each row's arithmetic is its own, so the
 * result does not depend on the split. */
typedef struct { task_fn fn; void *ctx; int n, per; } rows_job_t;

static void rows_chunk(void *p, int c) {
    const rows_job_t *r = p;
    const int t1 = (c + 1) * r->per < r->n ? (c + 1) * r->per : r->n;
    for (int t = c * r->per; t < t1; t++) r->fn(r->ctx, t);
}

static void parallel_rows(task_fn fn, void *ctx, int n) {
    int per = n / (16 * g_threads);
    per = per < 1 ? 1 : per;
    if (per == 1) { parallel_run(fn, ctx, n); return; }
    rows_job_t r = {fn, ctx, n, per};
    parallel_run(rows_chunk, &r, (n + per - 1) / per);
}

int pl_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

static size_t block_bytes(int kind) {
    return d_off(kind) + (has_m(kind) ? 64 : 32);
}

/* K-quant tiles: bytes per tile and 256-column super-block, and the offsets of their parts (see the header) */
#define K4_SC 2048
#define K4_MN 2176
#define K4_D 2304
#define K4_DMIN 2336
#define K6_HB 2048
#define K6_SC 3072
#define K6_D 3328
#define K5_HB 2048
static size_t kblock_bytes(int kind) { return kind == KIND_Q4_K ? 2368 : (kind == KIND_Q5_K ? 2880 : 3360); }
/* Q4_K and Q5_K share the arithmetic; Q5_K's scales, mins and d follow its 512 bytes of fifth bits */
static size_t k45_off(int kind) { return kind == KIND_Q5_K ? 512 : 0; }

/* ---- f16 <-> f32 (portable, exact; used by the scalar paths and activation scales) ---------------------- */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  /* subnormal */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f; memcpy(&f, &bits, 4); return f;
}

static uint16_t f32_to_f16(float f) {  /* round to nearest even, like _cvtss_sh / numpy */
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000; int32_t exp = ((x >> 23) & 0xFF) - 127 + 15; uint32_t man = x & 0x7FFFFF;
    if (((x >> 23) & 0xFF) == 0xFF) return (uint16_t)(sign | 0x7C00 | (man ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7C00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000; int shift = 14 - exp; uint32_t h = man >> shift, rem = man & ((1u << shift) - 1),
        half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
#endif
}

static float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

/* ---- activations -------------------------------------------------------------------------------------- */

static void quantize_row(const float *x, int K, int8_t *q, float *da, int32_t *sa_i, float *sa_f) {
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        int32_t s = 0;
#if defined(__AVX2__)
        /* the scalar loops' results, 8 lanes at a time: max_ps(|x|, m) keeps m where x is NaN (as `a > amax`
         * skips it); cvtps_epi32 rounds half to even (MXCSR's default mode, nearbyintf's) and gives INT_MIN
         * where (int) of a NaN does on x86; the low byte of each lane is the (int8_t) cast; integer sums exact */
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK; j += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)), m);
        float l[8];
        _mm256_storeu_ps(l, m);
        for (int j = 0; j < 8; j++) if (l[j] > amax) amax = l[j];
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        const __m256i low = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m256i pick = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);  /* the two lanes' 4 low bytes, together */
        __m256i vs = _mm256_setzero_si256();
        for (int j = 0; j < QK; j += 8) {
            const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j), vid));
            vs = _mm256_add_epi32(vs, v);
            const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, low), pick);
            _mm_storel_epi64((__m128i *)(q + b * QK + j), _mm256_castsi256_si128(bytes));
        }
        int32_t li[8];
        _mm256_storeu_si256((__m256i *)li, vs);
        for (int j = 0; j < 8; j++) s += li[j];
#else
        for (int j = 0; j < QK; j++) { float a = fabsf(xb[j]); if (a > amax) amax = a; }
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);  /* default rounding mode: half to even */
            q[b * QK + j] = (int8_t)v; s += v;
        }
#endif
        const float dh = round_f16(d);
        da[b] = dh; sa_i[b] = s; sa_f[b] = round_f16(d * (float)s);
    }
}

typedef struct { const float *x; int K; int8_t *qa; float *da; int32_t *sa_i; float *sa_f; } quant_job;

static void quant_chunk(void *p, int t) {
    const quant_job *q = p;
    const int nb = q->K / QK;
    quantize_row(q->x + (size_t)t * q->K, q->K, q->qa + (size_t)t * q->K, q->da + (size_t)t * nb,
                 q->sa_i + (size_t)t * nb, q->sa_f + (size_t)t * nb);
}

void pl_quantize_act(const float *x, int T, int K, int8_t *qa, float *da, int32_t *sa_i, float *sa_f) {
    quant_job q = {x, K, qa, da, sa_i, sa_f};
    parallel_rows(quant_chunk, &q, T);
}

/* q8_K (the K-quants' activations), as llama.cpp's quantize_row_q8_K_ref, which its x86 build uses: blocks of
 * 256, `max` the signed value of largest magnitude (the first one on ties), iscale = -127/max,
 * q = min(127, nearest_int(iscale * x)) (half to even), d = 1/iscale as float, bsums = sums of 16 codes. */
static void quantize_row_q8k(const float *x, int K, int8_t *q, float *d, int16_t *bs) {
    for (int b = 0; b < K / QKK; b++) {
        const float *xb = x + (size_t)b * QKK;
        int8_t *qb = q + (size_t)b * QKK;
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < QKK; j++) { const float a = fabsf(xb[j]); if (a > amax) { amax = a; mx = xb[j]; } }
        if (amax == 0.0f) {
            d[b] = 0.0f; memset(qb, 0, QKK); memset(bs + (size_t)b * 16, 0, 16 * sizeof(int16_t));
            continue;
        }
        const float iscale = -127.0f / mx;
        for (int j = 0; j < QKK; j++) {
            const int v = (int)nearbyintf(iscale * xb[j]);
            qb[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += qb[16 * g + j];
            bs[(size_t)b * 16 + g] = (int16_t)s;
        }
        d[b] = 1.0f / iscale;
    }
}

typedef struct { const float *x; int K; int8_t *qa; float *d; int16_t *bs; } quant_k_job;

static void quant_k_chunk(void *p, int t) {
    const quant_k_job *q = p;
    const int nsb = q->K / QKK;
    quantize_row_q8k(q->x + (size_t)t * q->K, q->K, q->qa + (size_t)t * q->K, q->d + (size_t)t * nsb,
                     q->bs + (size_t)t * nsb * 16);
}

void pl_quantize_act_k(const float *x, int T, int K, int8_t *qa, float *d, int16_t *bs) {
    quant_k_job q = {x, K, qa, d, bs};
    parallel_rows(quant_k_chunk, &q, T);
}

/* ---- K-quant tiles against T tokens: scalar reference ------------------------------------------------------
 * Q4_K per row:  sumi = sum_j sc_j * (sum_{32 cols of j} q*a), msum = sum_j mn_j * (bsum_2j + bsum_2j+1),
 *                y += (d*yd) * sumi + (-(dmin*yd)) * msum                   (llama.cpp ggml_vec_dot_q4_K_q8_K)
 * Q6_K per row:  sumi = sum_g sc_g * (sum_{16 cols of g} q*a - 32*bsum_g),  y += (d*yd) * sumi   (.._q6_K_q8_K)
 * Every sum before the float step is exact in int32. */
static void tile_k_scalar(int kind, const uint8_t *tp, int nsb, const int8_t *qa, const float *dA, const int16_t *bs,
                          int K, int T, float *y, int ldy) {
    const size_t bsz = kblock_bytes(kind);
    for (int t = 0; t < T; t++) {
        float acc[TILE] = {0};
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *bp = tp + sb * bsz;
            const int8_t *a = qa + (size_t)t * K + sb * QKK;
            const float yd = dA[(size_t)t * nsb + sb];
            const int16_t *bsum = bs + ((size_t)t * nsb + sb) * 16;
            for (int r = 0; r < TILE; r++) {
                int32_t sumi = 0;
                if (kind != KIND_Q6_K) {  /* Q4_K, Q5_K */
                    const size_t o = k45_off(kind);
                    int32_t msum = 0;
                    for (int j = 0; j < 8; j++) {
                        const uint8_t *nb = bp + j * 256, *hb = bp + K5_HB + j * 64;
                        const int8_t *aj = a + 32 * j;
                        int32_t s = 0;
                        for (int c = 0; c < 4; c++)
                            for (int i = 0; i < 4; i++) {
                                const uint8_t byte = nb[(c * TILE + r) * 4 + i];
                                int q0 = byte & 0x0F, q1 = byte >> 4;
                                if (kind == KIND_Q5_K) {
                                    const uint8_t h = hb[r * 4 + i];
                                    q0 |= ((h >> c) & 1) << 4;
                                    q1 |= ((h >> (4 + c)) & 1) << 4;
                                }
                                s += q0 * aj[4 * c + i] + q1 * aj[16 + 4 * c + i];
                            }
                        sumi += s * (int32_t)bp[o + K4_SC + j * TILE + r];
                        msum += (int32_t)bp[o + K4_MN + j * TILE + r] * ((int32_t)bsum[2 * j] + bsum[2 * j + 1]);
                    }
                    const uint16_t *dw = (const uint16_t *)(bp + o + K4_D), *mw = (const uint16_t *)(bp + o + K4_DMIN);
                    acc[r] += (f16_to_f32(dw[r]) * yd) * (float)sumi;
                    acc[r] += (-(f16_to_f32(mw[r]) * yd)) * (float)msum;
                } else {
                    const int8_t *sc = (const int8_t *)(bp + K6_SC);
                    for (int j = 0; j < 8; j++) {
                        const uint8_t *nb = bp + j * 256, *hb = bp + K6_HB + j * 128;
                        const int8_t *aj = a + 32 * j;
                        int32_t s0 = -32 * bsum[2 * j], s1 = -32 * bsum[2 * j + 1];
                        for (int c = 0; c < 4; c++)
                            for (int i = 0; i < 4; i++) {
                                const uint8_t byte = nb[(c * TILE + r) * 4 + i];
                                const uint8_t h0 = hb[r * 4 + i], h1 = hb[(TILE + r) * 4 + i];
                                const int q0 = (byte & 0x0F) | (((h0 >> (2 * c)) & 3) << 4);
                                const int q1 = (byte >> 4) | (((h1 >> (2 * c)) & 3) << 4);
                                s0 += q0 * aj[4 * c + i];
                                s1 += q1 * aj[16 + 4 * c + i];
                            }
                        sumi += s0 * sc[(2 * j) * TILE + r] + s1 * sc[(2 * j + 1) * TILE + r];
                    }
                    const uint16_t *dw = (const uint16_t *)(bp + K6_D);
                    acc[r] += (f16_to_f32(dw[r]) * yd) * (float)sumi;
                }
            }
        }
        memcpy(y + (size_t)t * ldy, acc, sizeof acc);
    }
}

/* ---- one tile (16 rows) against TN tokens: scalar reference ------------------------------------------ */

static void tile_scalar(int kind, const uint8_t *tp, int nb, const int8_t *qa, const float *da, const int32_t *sa_i,
                        const float *sa_f, int K, int T, float *y, int ldy) {
    const size_t bs = block_bytes(kind);
    for (int t = 0; t < T; t++) {
        float acc[TILE] = {0};
        for (int b = 0; b < nb; b++) {
            const uint8_t *bp = tp + b * bs;
            const int8_t *a = qa + (size_t)t * K + b * QK;
            const float dA = da[(size_t)t * nb + b];
            const uint16_t *dw = (const uint16_t *)(bp + d_off(kind));
            for (int r = 0; r < TILE; r++) {
                int32_t s = -corr_k(kind) * sa_i[(size_t)t * nb + b];
                if (kind == KIND_Q8_0) {
                    for (int c = 0; c < 8; c++)
                        for (int i = 0; i < 4; i++) s += (int32_t)bp[(c * TILE + r) * 4 + i] * a[4 * c + i];
                } else {
                    for (int c = 0; c < 4; c++)
                        for (int i = 0; i < 4; i++) {
                            const uint8_t byte = bp[(c * TILE + r) * 4 + i];
                            const int hb = is_q5(kind) ? bp[256 + r * 4 + i] : 0;  /* fifth bits */
                            int lo = (byte & 0x0F) | (((hb >> c) & 1) << 4);
                            int hi = (byte >> 4) | (((hb >> (4 + c)) & 1) << 4);
                            if (kind == KIND_IQ4_NL) { lo = IQ4NL[lo]; hi = IQ4NL[hi]; }
                            s += lo * a[4 * c + i] + hi * a[16 + 4 * c + i];
                        }
                }
                acc[r] += f16_to_f32(dw[r]) * (dA * (float)s);
                if (has_m(kind)) acc[r] += f16_to_f32(dw[TILE + r]) * sa_f[(size_t)t * nb + b];
            }
        }
        memcpy(y + (size_t)t * ldy, acc, sizeof acc);
    }
}

/* Software prefetch of the weight stream: decode (T <= 4) reads each weight byte once, and the hardware
 * prefetcher alone leaves the K-quant kernels' loads waiting on memory (a super-block tile is 2-3 regions read
 * in steps: Q6_K at T = 1 streamed at half the read bandwidth without it; bench/bench_matvec.py). Each of the 8
 * sub-block steps of a super-block asks for 1/8 of the block g_prefetch bytes ahead (a run of tiles is
 * contiguous, so this runs on into the next super-block and tile; past the end it is only a hint, never a
 * load). The 32-column kinds keep the hardware prefetcher alone (measured: software prefetch did not help them).
 * pl_set_prefetch(0) turns it off (for that comparison); the results never depend on it. */
#ifndef PL_PF_DIST
#define PL_PF_DIST 4096
#endif
static int g_prefetch = PL_PF_DIST;

void pl_set_prefetch(int bytes) { g_prefetch = bytes < 0 ? 0 : bytes; }
int pl_get_prefetch(void) { return g_prefetch; }

static inline __attribute__((always_inline)) void prefetch_part(const uint8_t *bp, size_t bsz, int j) {
    const int dist = g_prefetch;
    if (dist <= 0) return;
    const size_t lines = (bsz + 63) / 64, l0 = lines * j / 8, l1 = lines * (j + 1) / 8;
    for (size_t l = l0; l < l1; l++) __builtin_prefetch(bp + dist + 64 * l, 0, 3);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
/* ---- AVX512-VNNI: TN tokens at once share one unpacked weight block ------------------------------------ */

/* Q5_0/Q5_1's and Q5_K's fifth bit of register k (0..7) of a block, moved to bit 4 of each byte */
static inline __m512i hi1_512(__m512i h, int k) {
    const __m512i v = k <= 4 ? _mm512_sll_epi16(h, _mm_cvtsi32_si128(4 - k)) : _mm512_srl_epi16(h, _mm_cvtsi32_si128(k - 4));
    return _mm512_and_si512(v, _mm512_set1_epi8(0x10));
}

/* 4 activation bytes broadcast to every 32-bit lane, loaded straight from memory (vpbroadcastd m32) */
static inline __attribute__((always_inline)) __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* the k of "- k * sum a" of a 32-column kind's integer dot product (IQ4_NL: its +128 table offset) */
static int kind_corr(int kind) { return kind == KIND_IQ4_NL ? 128 : corr_k(kind); }
#define TILE_CORR_CODES 1  /* tile_fast takes -k * sum a per (token, block) in place of sum a */

static inline __attribute__((always_inline)) void
tile_avx512_tn(int kind, const uint8_t *tp, int nb, const int8_t *qa, const float *da, const int32_t *sa_i,
               const float *sa_f, int K, const int TN, float *y, int ldy) {
    const size_t bs = block_bytes(kind);
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int u = 0; u < TN; u++) acc[u] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *bp = tp + b * bs;
        __m512i w[8];
        __m512 dw, mw = _mm512_setzero_ps();
        if (kind == KIND_Q8_0) {
            for (int c = 0; c < 8; c++) w[c] = _mm512_loadu_si512((const void *)(bp + 64 * c));
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(bp + 64 * c));
                w[c] = _mm512_and_si512(v, low);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            if (is_q5(kind)) {
                const __m512i hb = _mm512_loadu_si512((const void *)(bp + 256));
                for (int k = 0; k < 8; k++) w[k] = _mm512_or_si512(w[k], hi1_512(hb, k));
            }
            if (kind == KIND_IQ4_NL) {  /* table + 128: u8 codes 1..241, corrected by -128 * sum a below */
                const __m512i tbl = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129,
                    (char)141, (char)153, (char)166, (char)181, (char)197, (char)217, (char)241));
                for (int k = 0; k < 8; k++) w[k] = _mm512_shuffle_epi8(tbl, w[k]);
            }
        }
        dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bp + d_off(kind))));
        if (has_m(kind)) mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bp + d_off(kind) + 32)));
#pragma GCC unroll 16
        for (int u = 0; u < TN; u++) {
            const int8_t *a = qa + (size_t)u * K + b * QK;
            const size_t ab = (size_t)u * nb + b;
            /* sa_i here: the integer correction -k * sum a itself (gemm_chunk's corr_codes), one broadcast load */
            __m512i s = kind_corr(kind) ? _mm512_set1_epi32(sa_i[ab]) : _mm512_setzero_si512();
            /* two dependency chains of 4 (integer sums: the same s in any order; ~5% faster than one of 8) */
            __m512i s1 = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                s = _mm512_dpbusd_epi32(s, w[c], bcast4(a + 4 * c));
                s1 = _mm512_dpbusd_epi32(s1, w[c + 4], bcast4(a + 4 * c + 16));
            }
            s = _mm512_add_epi32(s, s1);
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(da[ab]));
            acc[u] = _mm512_fmadd_ps(dw, f, acc[u]);
            if (has_m(kind)) acc[u] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sa_f[ab]), acc[u]);
        }
    }
#pragma GCC unroll 16
    for (int u = 0; u < TN; u++) _mm512_storeu_ps(y + (size_t)u * ldy, acc[u]);
}

/* one 32-column kind (a constant after inlining, so every kind gets its own unrolled loops): 16 tokens share
 * each unpacked weight block (16 accumulators + 8 weight registers of the 32), then 8, 4, 1 for the rest */
static inline __attribute__((always_inline)) void
tile_fast_kind(const int kind, const uint8_t *tp, int nb, const int8_t *qa, const float *da, const int32_t *sa_i,
               const float *sa_f, int K, int T, float *y, int ldy) {
    int t = 0;
#define TN_CALL(n) tile_avx512_tn(kind, tp, nb, qa + (size_t)t * K, da + (size_t)t * nb, sa_i + (size_t)t * nb, \
                                  sa_f + (size_t)t * nb, K, n, y + (size_t)t * ldy, ldy)
    for (; t + 16 <= T; t += 16) TN_CALL(16);
    for (; t + 8 <= T; t += 8) TN_CALL(8);
    for (; t + 4 <= T; t += 4) TN_CALL(4);
    for (; t < T; t++) TN_CALL(1);
#undef TN_CALL
}

static void tile_fast(int kind, const uint8_t *tp, int nb, const int8_t *qa, const float *da, const int32_t *sa_i,
                      const float *sa_f, int K, int T, float *y, int ldy) {
    switch (kind) {
#define TILE_KIND(k) case k: tile_fast_kind(k, tp, nb, qa, da, sa_i, sa_f, K, T, y, ldy); break;
        TILE_KIND(KIND_Q4_0) TILE_KIND(KIND_Q4_1) TILE_KIND(KIND_Q8_0) TILE_KIND(KIND_Q5_0) TILE_KIND(KIND_Q5_1)
        TILE_KIND(KIND_IQ4_NL)
#undef TILE_KIND
        default: break;
    }
}

/* Q6_K's 2 high bits of register c (0..3) of a sub-block, moved to bits 4-5 of each byte */
static inline __m512i hi2_512(__m512i h, int c) {
    const __m512i m30 = _mm512_set1_epi8(0x30);
    switch (c) {
        case 0: return _mm512_and_si512(_mm512_slli_epi16(h, 4), m30);
        case 1: return _mm512_and_si512(_mm512_slli_epi16(h, 2), m30);
        case 2: return _mm512_and_si512(h, m30);
        default: return _mm512_and_si512(_mm512_srli_epi16(h, 2), m30);
    }
}

static inline __attribute__((always_inline)) void
tile_k_avx512_tn(int kind, const uint8_t *tp, int nsb, const int8_t *qa, const float *dA, const int16_t *bs, int K,
                 const int TN, float *y, int ldy) {
    const size_t bsz = kblock_bytes(kind);
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[8];
    for (int u = 0; u < TN; u++) acc[u] = _mm512_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *bp = tp + sb * bsz;
        __m512i sumi[8];
        for (int u = 0; u < TN; u++) sumi[u] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            __m512i w[8], sc0, sc1;
            if (TN <= 4) prefetch_part(bp, bsz, j);
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(bp + 256 * j + 64 * c));
                w[c] = _mm512_and_si512(v, low);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            if (kind == KIND_Q6_K) {
                const __m512i h0 = _mm512_loadu_si512((const void *)(bp + K6_HB + 128 * j));
                const __m512i h1 = _mm512_loadu_si512((const void *)(bp + K6_HB + 128 * j + 64));
                for (int c = 0; c < 4; c++) {
                    w[c] = _mm512_or_si512(w[c], hi2_512(h0, c));
                    w[c + 4] = _mm512_or_si512(w[c + 4], hi2_512(h1, c));
                }
                sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bp + K6_SC + 32 * j)));
                sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bp + K6_SC + 32 * j + 16)));
            } else {
                if (kind == KIND_Q5_K) {
                    const __m512i h = _mm512_loadu_si512((const void *)(bp + K5_HB + 64 * j));
                    for (int k = 0; k < 8; k++) w[k] = _mm512_or_si512(w[k], hi1_512(h, k));
                }
                sc0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bp + k45_off(kind) + K4_SC + 16 * j)));
                sc1 = sc0;
            }
            for (int u = 0; u < TN; u++) {
                const int8_t *a = qa + (size_t)u * K + sb * QKK + 32 * j;
                const pl_i32u *a4 = (const pl_i32u *)a;
                if (kind != KIND_Q6_K) {
                    __m512i s = _mm512_setzero_si512();
                    for (int c = 0; c < 8; c++) s = _mm512_dpbusd_epi32(s, w[c], _mm512_set1_epi32(a4[c]));
                    sumi[u] = _mm512_add_epi32(sumi[u], _mm512_mullo_epi32(s, sc0));
                } else {
                    const int16_t *bsum = bs + ((size_t)u * nsb + sb) * 16;
                    __m512i s0 = _mm512_set1_epi32(-32 * bsum[2 * j]), s1 = _mm512_set1_epi32(-32 * bsum[2 * j + 1]);
                    for (int c = 0; c < 4; c++) {
                        s0 = _mm512_dpbusd_epi32(s0, w[c], _mm512_set1_epi32(a4[c]));
                        s1 = _mm512_dpbusd_epi32(s1, w[c + 4], _mm512_set1_epi32(a4[c + 4]));
                    }
                    sumi[u] = _mm512_add_epi32(sumi[u], _mm512_add_epi32(_mm512_mullo_epi32(s0, sc0),
                                                                         _mm512_mullo_epi32(s1, sc1)));
                }
            }
        }
        const size_t o = k45_off(kind);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bp + (kind == KIND_Q6_K ? K6_D : o + K4_D))));
        for (int u = 0; u < TN; u++) {
            const float yd = dA[(size_t)u * nsb + sb];
            acc[u] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(yd)), _mm512_cvtepi32_ps(sumi[u]), acc[u]);
            if (kind != KIND_Q6_K) {
                const int16_t *bsum = bs + ((size_t)u * nsb + sb) * 16;
                __m512i ms = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++) {
                    const __m512i mn = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bp + o + K4_MN + 16 * j)));
                    ms = _mm512_add_epi32(ms, _mm512_mullo_epi32(mn, _mm512_set1_epi32(bsum[2 * j] + bsum[2 * j + 1])));
                }
                const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bp + o + K4_DMIN)));
                const __m512 dmin = _mm512_mul_ps(_mm512_mul_ps(dm, _mm512_set1_ps(yd)), _mm512_set1_ps(-1.0f));
                acc[u] = _mm512_fmadd_ps(dmin, _mm512_cvtepi32_ps(ms), acc[u]);
            }
        }
    }
    for (int u = 0; u < TN; u++) _mm512_storeu_ps(y + (size_t)u * ldy, acc[u]);
}

static void tile_k_fast(int kind, const uint8_t *tp, int nsb, const int8_t *qa, const float *dA, const int16_t *bs,
                        int K, int T, float *y, int ldy) {
    int t = 0;
    for (; t + 8 <= T; t += 8)
        tile_k_avx512_tn(kind, tp, nsb, qa + (size_t)t * K, dA + (size_t)t * nsb, bs + (size_t)t * nsb * 16, K, 8,
                         y + (size_t)t * ldy, ldy);
    for (; t + 4 <= T; t += 4)
        tile_k_avx512_tn(kind, tp, nsb, qa + (size_t)t * K, dA + (size_t)t * nsb, bs + (size_t)t * nsb * 16, K, 4,
                         y + (size_t)t * ldy, ldy);
    for (; t < T; t++)
        tile_k_avx512_tn(kind, tp, nsb, qa + (size_t)t * K, dA + (size_t)t * nsb, bs + (size_t)t * nsb * 16, K, 1,
                         y + (size_t)t * ldy, ldy);
}
#define HAVE_FAST 1

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* ---- AVX2: the same tile as two halves of 8 rows; u8 x s8 pairs with maddubs, then madd to s32 ---------- */

/* Q5_0/Q5_1's and Q5_K's fifth bit of register k (0..7), moved to bit 4 of each byte */
static inline __m256i hi1_256(__m256i h, int k) {
    const __m256i v = k <= 4 ? _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - k)) : _mm256_srl_epi16(h, _mm_cvtsi32_si128(k - 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* signed w (|w| <= 127) x signed a: maddubs(|w|, sign(a, w)), llama.cpp's mul_add_epi8 */
static inline __m256i dot_s8s8(__m256i acc, __m256i w, __m256i a) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline __m256i dot_u8s8(__m256i acc, __m256i w, __m256i a) {
    const __m256i p16 = _mm256_maddubs_epi16(w, a);  /* Q4: |15*127*2| fits; Q8 handled by the caller */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* NT (1 or 2) consecutive tokens against one tile: each weight block is loaded and unpacked once for all NT
 * tokens. Q4_0/Q4_1 sum their 8 maddubs per block and half in int16 before one madd (8 * 2 * 15 * 128 = 30720
 * fits), the other kinds madd after each maddubs as before; integer sums are exact either way, and the float
 * accumulation per token is the same sequence as the one-token loop's, so y does not depend on NT or T. */
static inline __attribute__((always_inline)) void tile_fast_tn(
        int kind, const uint8_t *tp, int nb, const int8_t *qa, const float *da, const int32_t *sa_i,
        const float *sa_f, int K, int t, const int NT, float *y, int ldy) {
    const size_t bs = block_bytes(kind);
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int q4 = kind == KIND_Q4_0 || kind == KIND_Q4_1;
    __m256 acc0[2], acc1[2];
    for (int u = 0; u < NT; u++) { acc0[u] = _mm256_setzero_ps(); acc1[u] = _mm256_setzero_ps(); }
    for (int b = 0; b < nb; b++) {
        const uint8_t *bp = tp + b * bs;
        const pl_i32u *a4[2];  /* one vpbroadcastd from memory per dword */
        size_t ab[2];
        for (int u = 0; u < NT; u++) {
            a4[u] = (const pl_i32u *)(qa + (size_t)(t + u) * K + b * QK);
            ab[u] = (size_t)(t + u) * nb + b;
        }
        __m256i s0[2], s1[2];
        if (kind == KIND_Q8_0) {
            /* the u8 codes (w + 128) back to signed w (one xor), then the sign trick: |w| <= 128 and
             * |a| <= 127 keep maddubs' s16 pair sums exact; the same int32 sums as sum((w + 128) a) - 128 sum a */
            const __m256i flip = _mm256_set1_epi8((char)0x80);
            for (int u = 0; u < NT; u++) { s0[u] = _mm256_setzero_si256(); s1[u] = s0[u]; }
            for (int c = 0; c < 8; c++) {
                const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(bp + 64 * c)), flip);
                const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(bp + 64 * c + 32)), flip);
                for (int u = 0; u < NT; u++) {
                    const __m256i av = _mm256_set1_epi32(a4[u][c]);
                    s0[u] = dot_s8s8(s0[u], w0, av);
                    s1[u] = dot_s8s8(s1[u], w1, av);
                }
            }
        } else {
            __m256i p0[2], p1[2];
            for (int u = 0; u < NT; u++) {
                s0[u] = _mm256_set1_epi32(-corr_k(kind) * sa_i[ab[u]]); s1[u] = s0[u];
                p0[u] = _mm256_setzero_si256(); p1[u] = p0[u];
            }
            const int q5 = is_q5(kind);  /* codes up to 31: 2 * 31 * 128 fits the s16 pair sums */
            const __m256i hb0 = q5 ? _mm256_loadu_si256((const __m256i *)(bp + 256)) : _mm256_setzero_si256();
            const __m256i hb1 = q5 ? _mm256_loadu_si256((const __m256i *)(bp + 288)) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(bp + 64 * c));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(bp + 64 * c + 32));
                __m256i l0 = _mm256_and_si256(v0, low), l1 = _mm256_and_si256(v1, low);
                __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
                __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
                if (q5) {
                    l0 = _mm256_or_si256(l0, hi1_256(hb0, c)); l1 = _mm256_or_si256(l1, hi1_256(hb1, c));
                    h0 = _mm256_or_si256(h0, hi1_256(hb0, 4 + c)); h1 = _mm256_or_si256(h1, hi1_256(hb1, 4 + c));
                }
                if (kind == KIND_IQ4_NL) {
                    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4NL));
                    l0 = _mm256_shuffle_epi8(tbl, l0); l1 = _mm256_shuffle_epi8(tbl, l1);
                    h0 = _mm256_shuffle_epi8(tbl, h0); h1 = _mm256_shuffle_epi8(tbl, h1);
                }
                for (int u = 0; u < NT; u++) {
                    const __m256i al = _mm256_set1_epi32(a4[u][c]), ah = _mm256_set1_epi32(a4[u][c + 4]);
                    if (kind == KIND_IQ4_NL) {
                        s0[u] = dot_s8s8(s0[u], l0, al); s1[u] = dot_s8s8(s1[u], l1, al);
                        s0[u] = dot_s8s8(s0[u], h0, ah); s1[u] = dot_s8s8(s1[u], h1, ah);
                    } else if (q4) {
                        p0[u] = _mm256_add_epi16(p0[u], _mm256_maddubs_epi16(l0, al));
                        p1[u] = _mm256_add_epi16(p1[u], _mm256_maddubs_epi16(l1, al));
                        p0[u] = _mm256_add_epi16(p0[u], _mm256_maddubs_epi16(h0, ah));
                        p1[u] = _mm256_add_epi16(p1[u], _mm256_maddubs_epi16(h1, ah));
                    } else {
                        s0[u] = dot_u8s8(s0[u], l0, al); s1[u] = dot_u8s8(s1[u], l1, al);
                        s0[u] = dot_u8s8(s0[u], h0, ah); s1[u] = dot_u8s8(s1[u], h1, ah);
                    }
                }
            }
            if (q4)
                for (int u = 0; u < NT; u++) {
                    s0[u] = _mm256_add_epi32(s0[u], _mm256_madd_epi16(p0[u], ones));
                    s1[u] = _mm256_add_epi32(s1[u], _mm256_madd_epi16(p1[u], ones));
                }
        }
        const size_t doff = d_off(kind);
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + doff)));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + doff + 16)));
        __m256 m0 = d0, m1 = d1;
        if (has_m(kind)) {
            m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + doff + 32)));
            m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + doff + 48)));
        }
        for (int u = 0; u < NT; u++) {
            const __m256 dA = _mm256_set1_ps(da[ab[u]]);
            acc0[u] = _mm256_fmadd_ps(d0, _mm256_mul_ps(_mm256_cvtepi32_ps(s0[u]), dA), acc0[u]);
            acc1[u] = _mm256_fmadd_ps(d1, _mm256_mul_ps(_mm256_cvtepi32_ps(s1[u]), dA), acc1[u]);
            if (has_m(kind)) {
                const __m256 sA = _mm256_set1_ps(sa_f[ab[u]]);
                acc0[u] = _mm256_fmadd_ps(m0, sA, acc0[u]);
                acc1[u] = _mm256_fmadd_ps(m1, sA, acc1[u]);
            }
        }
    }
    for (int u = 0; u < NT; u++) {
        _mm256_storeu_ps(y + (size_t)(t + u) * ldy, acc0[u]);
        _mm256_storeu_ps(y + (size_t)(t + u) * ldy + 8, acc1[u]);
    }
}

static void tile_fast(int kind, const uint8_t *tp, int nb, const int8_t *qa, const float *da, const int32_t *sa_i,
                      const float *sa_f, int K, int T, float *y, int ldy) {
    int t = 0;
    for (; t + 2 <= T; t += 2) tile_fast_tn(kind, tp, nb, qa, da, sa_i, sa_f, K, t, 2, y, ldy);
    for (; t < T; t++) tile_fast_tn(kind, tp, nb, qa, da, sa_i, sa_f, K, t, 1, y, ldy);
}

/* AVX2 K-quant tile: two halves of 8 rows. maddubs (u8 x s8 -> s16 pairs) sums stay inside int16 (Q4_K: 8 of them
 * <= 8*2*15*127; Q6_K: 2 of them <= 2*2*63*127), then madd with the row's scale in both int16 halves of its lane
 * gives scale * (sum of 4 products) in int32. */
static inline __m256i scale_pair(__m256i x32) {  /* int32 lanes holding an int16 value v -> (v, v) int16 pairs */
    return _mm256_or_si256(_mm256_and_si256(x32, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(x32, 16));
}

static inline __m256i hi2_256(__m256i h, int c) {
    const __m256i m30 = _mm256_set1_epi8(0x30);
    switch (c) {
        case 0: return _mm256_and_si256(_mm256_slli_epi16(h, 4), m30);
        case 1: return _mm256_and_si256(_mm256_slli_epi16(h, 2), m30);
        case 2: return _mm256_and_si256(h, m30);
        default: return _mm256_and_si256(_mm256_srli_epi16(h, 2), m30);
    }
}

static void tile_k_fast(int kind, const uint8_t *tp, int nsb, const int8_t *qa, const float *dA, const int16_t *bs,
                        int K, int T, float *y, int ldy) {
    const size_t bsz = kblock_bytes(kind), o = k45_off(kind);
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < T; t++) {
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *bp = tp + sb * bsz;
            const int8_t *a = qa + (size_t)t * K + sb * QKK;
            const float yd = dA[(size_t)t * nsb + sb];
            const int16_t *bsum = bs + ((size_t)t * nsb + sb) * 16;
            for (int h = 0; h < 2; h++) {  /* rows 8h .. 8h+7: bytes 32h .. 32h+31 of every 64-byte group */
                __m256i sumi = _mm256_setzero_si256(), ms = _mm256_setzero_si256();
                for (int j = 0; j < 8; j++) {
                    const pl_i32u *a4 = (const pl_i32u *)(a + 32 * j);
                    if (T <= 4 && h == 0) prefetch_part(bp, bsz, j);
                    const uint8_t *nb = bp + 256 * j + 32 * h;
                    if (kind != KIND_Q6_K) {
                        /* Q5_K codes reach 31: 4 maddubs per int16 accumulator (<= 4*2*31*127), two of them */
                        __m256i p = _mm256_setzero_si256(), p2 = _mm256_setzero_si256();
                        const __m256i hb = kind == KIND_Q5_K ?
                            _mm256_loadu_si256((const __m256i *)(bp + K5_HB + 64 * j + 32 * h)) : _mm256_setzero_si256();
                        for (int c = 0; c < 4; c++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(nb + 64 * c));
                            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                            if (kind == KIND_Q5_K) {
                                lo = _mm256_or_si256(lo, hi1_256(hb, c));
                                hi = _mm256_or_si256(hi, hi1_256(hb, 4 + c));
                            }
                            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a4[c])));
                            p2 = _mm256_add_epi16(p2, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a4[c + 4])));
                        }
                        const __m256i sc = scale_pair(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bp + o + K4_SC + 16 * j + 8 * h))));
                        if (kind == KIND_Q4_K) sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_add_epi16(p, p2), sc));
                        else sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(p, sc), _mm256_madd_epi16(p2, sc)));
                        const __m256i mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bp + o + K4_MN + 16 * j + 8 * h)));
                        const int b2 = bsum[2 * j] + bsum[2 * j + 1];
                        ms = _mm256_add_epi32(ms, _mm256_madd_epi16(mn, _mm256_set1_epi32((uint16_t)b2)));
                    } else {
                        const __m256i h0 = _mm256_loadu_si256((const __m256i *)(bp + K6_HB + 128 * j + 32 * h));
                        const __m256i h1 = _mm256_loadu_si256((const __m256i *)(bp + K6_HB + 128 * j + 64 + 32 * h));
                        __m256i p[4];
                        for (int c = 0; c < 4; c++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(nb + 64 * c));
                            const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low), hi2_256(h0, c));
                            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), hi2_256(h1, c));
                            const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a4[c]));
                            const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a4[c + 4]));
                            if (c & 1) { p[c - 1] = _mm256_add_epi16(p[c - 1], pl); p[c] = _mm256_add_epi16(p[c], ph); }
                            else { p[c] = pl; p[c + 1] = ph; }
                        }
                        /* p[0], p[2]: columns 0-15 (group 2j); p[1], p[3]: columns 16-31 (group 2j+1) */
                        const __m256i s0 = scale_pair(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bp + K6_SC + 32 * j + 8 * h))));
                        const __m256i s1 = scale_pair(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bp + K6_SC + 32 * j + 16 + 8 * h))));
                        sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(p[0], s0), _mm256_madd_epi16(p[2], s0)));
                        sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(p[1], s1), _mm256_madd_epi16(p[3], s1)));
                        ms = _mm256_add_epi32(ms, _mm256_madd_epi16(s0, _mm256_set1_epi32((uint16_t)bsum[2 * j])));
                        ms = _mm256_add_epi32(ms, _mm256_madd_epi16(s1, _mm256_set1_epi32((uint16_t)bsum[2 * j + 1])));
                    }
                }
                const __m256 ydv = _mm256_set1_ps(yd);
                if (kind != KIND_Q6_K) {
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + o + K4_D + 16 * h)));
                    const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + o + K4_DMIN + 16 * h)));
                    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(d, ydv), _mm256_cvtepi32_ps(sumi), acc[h]);
                    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(dm, ydv), _mm256_set1_ps(-1.0f)),
                                             _mm256_cvtepi32_ps(ms), acc[h]);
                } else {
                    sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(ms, 5));
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + K6_D + 16 * h)));
                    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(d, ydv), _mm256_cvtepi32_ps(sumi), acc[h]);
                }
            }
        }
        _mm256_storeu_ps(y + (size_t)t * ldy, acc[0]);
        _mm256_storeu_ps(y + (size_t)t * ldy + 8, acc[1]);
    }
}
#define HAVE_FAST 1
#endif

/* ---- the matrix product: tiles split across threads, each thread a contiguous run of weight memory -------- */

/* Ask for the next tile's weights (into L2) while this one is computed: a tile is a few KB read block by block,
 * and with many tokens per tile (batched decode, prefill) the computation between its cache lines is long
 * enough that the hardware prefetcher falls behind a model larger than the L3 (SmolLM2's 30 MB lm_head ran at
 * ~60% of its in-cache rate; two tiles ahead measured best). */
static inline void prefetch_tile(const uint8_t *p, size_t bytes) {
#if defined(__x86_64__) || defined(__i386__)
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + o), _MM_HINT_T1);
#else
    (void)p; (void)bytes;
#endif
}

typedef struct {
    int kind, tiles, K, T, ldy, force_scalar, tiles_per_chunk;
    const uint8_t *w; const int8_t *qa; const float *da; const int32_t *sa_i; const float *sa_f; float *y;
} gemm_job;

static void gemm_k_chunk(const gemm_job *g, int chunk) {
    const int nsb = g->K / QKK;
    const size_t tile_bytes = (size_t)nsb * kblock_bytes(g->kind);
    const int16_t *bs = (const int16_t *)g->sa_i;  /* K-quants: the q8_K block sums, 16 per super-block */
    const int i0 = chunk * g->tiles_per_chunk;
    const int i1 = i0 + g->tiles_per_chunk < g->tiles ? i0 + g->tiles_per_chunk : g->tiles;
    for (int i = i0; i < i1; i++) {
        const uint8_t *tp = g->w + (size_t)i * tile_bytes;
        if (g->T >= 4 && i + 2 < g->tiles) prefetch_tile(tp + 2 * tile_bytes, tile_bytes);
        for (int t0 = 0; t0 < g->T; t0 += 64) {
            const int tn = g->T - t0 < 64 ? g->T - t0 : 64;
            const size_t ao = (size_t)t0 * nsb;
            float *yo = g->y + (size_t)t0 * g->ldy + (size_t)i * TILE;
#ifdef HAVE_FAST
            if (!g->force_scalar)
                tile_k_fast(g->kind, tp, nsb, g->qa + (size_t)t0 * g->K, g->da + ao, bs + ao * 16, g->K, tn, yo, g->ldy);
            else
#endif
                tile_k_scalar(g->kind, tp, nsb, g->qa + (size_t)t0 * g->K, g->da + ao, bs + ao * 16, g->K, tn, yo,
                              g->ldy);
        }
    }
}

#define GEMM_GROUP_BYTES 196608  /* activation code bytes per token group of a prompt chunk */

#ifdef TILE_CORR_CODES
static _Thread_local int32_t *corr_buf = NULL;  /* gemm_chunk's -k * sum a codes of one token group */
static _Thread_local size_t corr_cap = 0;
#endif

static void gemm_chunk(void *p, int chunk) {
    const gemm_job *g = p;
    if (is_k(g->kind)) { gemm_k_chunk(g, chunk); return; }
    const int nb = g->K / QK;
    const size_t tile_bytes = (size_t)nb * block_bytes(g->kind);
    const int i0 = chunk * g->tiles_per_chunk;
    const int i1 = i0 + g->tiles_per_chunk < g->tiles ? i0 + g->tiles_per_chunk : g->tiles;
    /* Prompt chunks: the tokens in groups of ~192 KB of activation codes (64 tokens at K = 3072), the run of
     * tiles streamed past each group; a tile (<= a few 10 KB) stays in L1/L2 while the group's tokens use it. */
    int corr_failed = 0;
    int tg = (int)(GEMM_GROUP_BYTES / (size_t)g->K) / 16 * 16;
    tg = tg < 16 ? 16 : tg;
    for (int t0 = 0; t0 < g->T; t0 += tg) {
        const int tn = g->T - t0 < tg ? g->T - t0 : tg;
        const size_t ao = (size_t)t0 * nb;
        const int32_t *sums = g->sa_i + ao;
        (void)sums; (void)corr_failed;  /* used by the vector paths only */
#ifdef TILE_CORR_CODES
        if (!g->force_scalar && kind_corr(g->kind)) {  /* -k * sum a for the group's (token, block)s, once */
            const size_t n = (size_t)tn * nb;
            if (corr_cap < n) {
                free(corr_buf);
                corr_buf = malloc(n * sizeof(int32_t));
                corr_cap = corr_buf ? n : 0;
            }
            if (corr_buf != NULL) {
                const int32_t k = -kind_corr(g->kind);
                for (size_t j = 0; j < n; j++) corr_buf[j] = k * sums[j];
                sums = corr_buf;
            } else {  /* out of memory: the plain-C path, which needs no buffer */
                corr_failed = 1;
            }
        }
#endif
        for (int i = i0; i < i1; i++) {
            const uint8_t *tp = g->w + (size_t)i * tile_bytes;
            if (g->T >= 4 && i + 2 < g->tiles) prefetch_tile(tp + 2 * tile_bytes, tile_bytes);
            float *yo = g->y + (size_t)t0 * g->ldy + (size_t)i * TILE;
#ifdef HAVE_FAST
            if (!g->force_scalar && !corr_failed)
                tile_fast(g->kind, tp, nb, g->qa + (size_t)t0 * g->K, g->da + ao, sums, g->sa_f + ao, g->K,
                          tn, yo, g->ldy);
            else
#endif
                tile_scalar(g->kind, tp, nb, g->qa + (size_t)t0 * g->K, g->da + ao, g->sa_i + ao, g->sa_f + ao,
                            g->K, tn, yo, g->ldy);
        }
    }
}

/* ---- the matrix product: runs of tiles (each a contiguous stretch of weight memory) claimed by the threads -- */

/* K-quant kinds: da is q8_K's d (T, K/256) and sa_i points at its int16 bsums (T, K/16); sa_f is unused. */
void pl_gemm(int kind, const uint8_t *w, int tiles, int K, const int8_t *qa, const float *da, const int32_t *sa_i,
             const float *sa_f, int T, float *y, int ldy, int force_scalar) {
    /* ~4 chunks per thread at decode (load balance on a busy machine), >= 2 tiles each */
    int per = tiles / (4 * g_threads);
    per = per < 2 ? 2 : per;
    gemm_job g = {kind, tiles, K, T, ldy, force_scalar, per, w, qa, da, sa_i, sa_f, y};
    parallel_run(gemm_chunk, &g, (tiles + per - 1) / per);
}

/* ---- one decode step of a whole Phi-3 / Llama decoder in C (batch 1, one token) ----------------------------
 *
 * The same arithmetic as model.py's forward for T = 1 with a KV cache, with every linear on the kernels above:
 * RMSNorm (fp32) -> qkv -> rotate-half RoPE on the first rotary_dim dims (cos/sin rows from the model's own
 * rotary table, so LongRoPE factors and magnitude are the model's) -> keys/values stored at `pos` -> attention
 * over the visible keys [lo, pos] (the sliding window) -> o_proj + residual -> RMSNorm -> gate_up ->
 * up * silu(gate) -> down + residual. pl_decode_token (below) wraps it with the embedding row, the final norm,
 * lm_head and the greedy argmax, so a decoded token is one call.
 * KV cache layouts: f16 (kv_type 1; queries are rounded to f16 for the q.k products, as llama.cpp's f16
 * attention does) or int8 with one f32 scale per (layer, head, position) (kv_type 2: amax/127, half to even),
 * or ggml's Q8_0 / Q4_0 blocks of 32 values along head_dim kept as two arrays, codes and f16 scales
 * (kv_type 3: int8 codes (.., head_dim), d = amax/127, q = roundf(x/d); kv_type 4: nibbles (.., head_dim/2),
 * byte j = values j | j+16 << 4, d = signed max/-8, q = trunc(x/d + 8.5) clamped to [0, 15]; both as
 * pocketlm/kvcache.py and ggml-quants.c quantize_row_q{8,4}_0_ref). Queries stay f32 for the quantized types.
 */
typedef struct { const uint8_t *w; int kind, rows, cols; } pl_mat;
typedef struct { const float *attn_norm, *ffn_norm; pl_mat qkv, o, gate_up, down; } pl_layer;
typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter, rotary_dim, capacity, kv_type;
    float eps;
    const pl_layer *layers;
    void *k, *v;               /* (layers, n_kv, capacity, head_dim) */
    float *k_scale, *v_scale;  /* int8: f32 (layers, n_kv, capacity); q8_0/q4_0: f16 (layers, n_kv, capacity, hd/32) */
    float *xn, *qkv, *att, *gu, *hmid, *y, *scores;  /* scratch; scores: n_heads * capacity */
    int8_t *qa; float *da, *sa_f; int32_t *sa_i;     /* activation codes for the widest input */
} pl_model;

static void silu_row(const float *gu, int n, float *hm);  /* up * silu(gate), defined with the vector helpers */
static float exp_shifted(float *sc, int n, float mx);  /* sc = e^(sc - mx), returns the sum; vector helpers */

/* a KV cache type C stores (1 f16, 2 int8, 3 q8_0, 4 q4_0; 0 f32 for pl_prefill) for this head_dim */
static int kv_type_ok(int kv_type, int hd) {
    return kv_type >= 0 && kv_type <= 4 && !((kv_type == 3 || kv_type == 4) && hd % 32);
}

/* every layer in the fused Phi-3 shapes (qkv, o, gate_up, down) that the batched steps' scratch widths assume */
static int fused_layers_ok(const pl_model *m) {
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, D = m->hidden;
    for (int l = 0; l < m->n_layers; l++) {
        const pl_layer *L = &m->layers[l];
        if (L->qkv.rows != (H + 2 * KV) * hd || L->qkv.cols != D || L->o.rows != D || L->o.cols != H * hd ||
            L->gate_up.rows != 2 * m->inter || L->gate_up.cols != D || L->down.rows != D || L->down.cols != m->inter)
            return 0;
    }
    return 1;
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    /* the sum of squares in double as 8 running sums (lanes i % 8) added in a fixed order: one chain of n
     * dependent double additions was most of the element-wise rows' time; the compiler vectorizes the 8 lanes
     * (the order within each is kept), so every build and every path gets the same sum */
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int u = 0; u < 8; u++) l[u] += (double)x[i + u] * x[i + u];
    for (; i < n; i++) l[i % 8] += (double)x[i] * x[i];
    const double ss = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* ---- matrices made of row blocks of different kinds (KIND_PARTS) ---------------------------------------------
 *
 * A fused projection whose row blocks a GGUF file stores in different types (llama.cpp's Q4_K_M of a model
 * whose rows are not a multiple of 256: attn_q/attn_k Q5_0 but attn_v Q8_0; ffn_gate and ffn_up of different
 * types) is a pl_mat of kind KIND_PARTS: `w` points at an array of pl_mat parts, each of a kernels kind with the
 * outer mat's cols, ended by a part with rows 0 (w NULL); their rows stack in order (part i's rows follow part
 * i-1's), summing to the outer rows. Each part quantizes the activations for its own kind (q8_0/q8_1 blocks of
 * 32, or q8_K; redone only when the family changes) and writes its rows at its row offset. pl_gemm writes whole
 * 16-row tiles, so every part but the last must have rows % 16 == 0 (its padding then lands on rows the next
 * part writes afterwards, and the last part's ends where the outer mat's padding ends): pl_mat_check says
 * whether a mat is such a one (the Python side calls it once when it builds the structs). The same integer
 * arithmetic as each part's own pl_gemm, so the result equals the parts computed one by one. */
#define KIND_PARTS 64
#define MAX_PARTS 16

/* 0 if `w` is a plain mat of a kernels kind or a well-formed KIND_PARTS mat (above), else -1 */
int pl_mat_check(const pl_mat *w) {
    if (w == NULL || w->w == NULL || w->rows <= 0 || w->cols <= 0) return -1;
    if (w->kind != KIND_PARTS)
        return (w->kind >= 0 && w->kind <= KIND_IQ4_NL && w->cols % (is_k(w->kind) ? QKK : QK) == 0) ? 0 : -1;
    const pl_mat *p = (const pl_mat *)w->w;
    int rows = 0, n = 0;
    for (; p->rows > 0; p++, n++) {
        if (n >= MAX_PARTS || p->kind == KIND_PARTS || p->cols != w->cols || pl_mat_check(p) != 0) return -1;
        if (rows % TILE) return -1;  /* a part before this one was not whole tiles */
        rows += p->rows;
    }
    return (n >= 1 && rows == w->rows) ? 0 : -1;
}

/* y (T, ldy) = x (T, w->cols) @ W.T for a KIND_PARTS mat, with the activation-code buffers qa/da/sa_i/sa_f */
static void parts_product(const pl_mat *w, const float *x, int T, float *y, int ldy, int8_t *qa, float *da,
                          int32_t *sa_i, float *sa_f) {
    int off = 0, family = -1;
    for (const pl_mat *p = (const pl_mat *)w->w; p->rows > 0; off += p->rows, p++) {
        const int k = is_k(p->kind);
        if (k != family) {
            if (T == 1 && k) quantize_row_q8k(x, p->cols, qa, da, (int16_t *)sa_i);
            else if (T == 1) quantize_row(x, p->cols, qa, da, sa_i, sa_f);
            else if (k) pl_quantize_act_k(x, T, p->cols, qa, da, (int16_t *)sa_i);
            else pl_quantize_act(x, T, p->cols, qa, da, sa_i, sa_f);
            family = k;
        }
        pl_gemm(p->kind, p->w, (p->rows + TILE - 1) / TILE, p->cols, qa, da, sa_i, sa_f, T, y + off, ldy, 0);
    }
}

static void matvec(const pl_model *m, const pl_mat *w, const float *x, float *y) {
    if (w->kind == KIND_PARTS) {
        parts_product(w, x, 1, y, (w->rows + TILE - 1) / TILE * TILE, m->qa, m->da, m->sa_i, m->sa_f);
        return;
    }
    if (is_k(w->kind)) quantize_row_q8k(x, w->cols, m->qa, m->da, (int16_t *)m->sa_i);  /* sa_i: cols/16 int16 */
    else quantize_row(x, w->cols, m->qa, m->da, m->sa_i, m->sa_f);
    const int tiles = (w->rows + TILE - 1) / TILE;
    pl_gemm(w->kind, w->w, tiles, w->cols, m->qa, m->da, m->sa_i, m->sa_f, 1, y, tiles * TILE, 0);
}

static void rope(float *v, int n_heads, int hd, int rd, const float *cos, const float *sin) {
    const int h2 = rd / 2;
    for (int h = 0; h < n_heads; h++) {
        float *x = v + (size_t)h * hd;
        for (int i = 0; i < h2; i++) {
            const float x1 = x[i], x2 = x[i + h2];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + h2] = x2 * cos[i + h2] + x1 * sin[i + h2];
        }
    }
}

static float dot_f16(const uint16_t *k, const float *q, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(__F16C__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), _mm256_loadu_ps(q + i), acc);
    float t[8]; _mm256_storeu_ps(t, acc);
    s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
    for (; i < n; i++) s += f16_to_f32(k[i]) * q[i];
    return s;
}

static void axpy_f16(float *out, float p, const uint16_t *v, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__FMA__)
    const __m256 pv = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i))),
                                                  _mm256_loadu_ps(out + i)));
#endif
    for (; i < n; i++) out[i] += p * f16_to_f32(v[i]);
}

static float dot_i8(const int8_t *k, const float *q, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 kv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(k + i))));
        acc = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + i), acc);
    }
    float t[8]; _mm256_storeu_ps(t, acc);
    s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
    for (; i < n; i++) s += q[i] * (float)k[i];
    return s;
}

static void axpy_i8(float *out, float p, const int8_t *v, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 pv = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8) {
        const __m256 vv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v + i))));
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, vv, _mm256_loadu_ps(out + i)));
    }
#endif
    for (; i < n; i++) out[i] += p * (float)v[i];
}

/* one head row (hd values, hd % 32 == 0) -> Q8_0 codes + f16 scales */
static void quant_row_q8_0(const float *x, int hd, int8_t *q, uint16_t *d) {
    for (int b = 0; b < hd / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float s = amax / 127.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
        for (int i = 0; i < 32; i++) {
            const float t = roundf(xb[i] * id);
            q[b * 32 + i] = (int8_t)(isfinite(t) ? t : 0.0f);
        }
        d[b] = f32_to_f16(s);
    }
}

/* one head row -> Q4_0 nibbles (byte j of a block: value j low, value j + 16 high) + f16 scales */
static void quant_row_q4_0(const float *x, int hd, uint8_t *q, uint16_t *d) {
    for (int b = 0; b < hd / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < 32; i++) if (fabsf(xb[i]) > amax) { amax = fabsf(xb[i]); max = xb[i]; }
        const float s = max / -8.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
        uint8_t c[32];
        for (int i = 0; i < 32; i++) {
            const float t = xb[i] * id;
            const float u = truncf(t + 8.5f);
            const int v = isfinite(u) ? (int)u : 0;
            c[i] = (uint8_t)(v < 0 ? 0 : (v > 15 ? 15 : v));
        }
        for (int j = 0; j < 16; j++) q[b * 16 + j] = (uint8_t)(c[j] | (c[j + 16] << 4));
        d[b] = f32_to_f16(s);
    }
}

/* q8_0 / q4_0 attention: per 32-value block, the int8 dot product / axpy above times the block's f16 scale
 * (q4_0's nibbles are unpacked to int8 q - 8 first) */
static float dot_q8_0(const int8_t *k, const uint16_t *d, const float *q, int hd) {
    float s = 0.0f;
    for (int b = 0; b < hd / 32; b++) s += dot_i8(k + b * 32, q + b * 32, 32) * f16_to_f32(d[b]);
    return s;
}

static void axpy_q8_0(float *out, float p, const int8_t *v, const uint16_t *d, int hd) {
    for (int b = 0; b < hd / 32; b++) axpy_i8(out + b * 32, p * f16_to_f32(d[b]), v + b * 32, 32);
}

static void unpack_q4_0(const uint8_t *c, int8_t *q) {
    for (int j = 0; j < 16; j++) { q[j] = (int8_t)((c[j] & 15) - 8); q[j + 16] = (int8_t)((c[j] >> 4) - 8); }
}

#if defined(__AVX2__) && defined(__FMA__)
/* one q4_0 block's 32 codes as int8 q - 8: values 0..15 (low nibbles) and 16..31 (high nibbles) */
static inline void unpack_q4_0_avx2(const uint8_t *c, __m128i *lo, __m128i *hi) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)c), m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
    *lo = _mm_sub_epi8(_mm_and_si128(raw, m4), e8);
    *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), e8);
}

static inline __m256 i8x8_ps(__m128i x) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)); }
#endif

static float dot_q4_0(const uint8_t *k, const uint16_t *d, const float *q, int hd) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 total = _mm256_setzero_ps();
    for (int b = 0; b < hd / 32; b++) {
        __m128i lo, hi;
        unpack_q4_0_avx2(k + b * 16, &lo, &hi);
        const float *qb = q + b * 32;
        __m256 acc = _mm256_mul_ps(i8x8_ps(lo), _mm256_loadu_ps(qb));
        acc = _mm256_fmadd_ps(i8x8_ps(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(qb + 8), acc);
        acc = _mm256_fmadd_ps(i8x8_ps(hi), _mm256_loadu_ps(qb + 16), acc);
        acc = _mm256_fmadd_ps(i8x8_ps(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(qb + 24), acc);
        total = _mm256_fmadd_ps(acc, _mm256_set1_ps(f16_to_f32(d[b])), total);
    }
    float t[8]; _mm256_storeu_ps(t, total);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#else
    float s = 0.0f;
    int8_t t[32];
    for (int b = 0; b < hd / 32; b++) {
        unpack_q4_0(k + b * 16, t);
        s += dot_i8(t, q + b * 32, 32) * f16_to_f32(d[b]);
    }
    return s;
#endif
}

static void axpy_q4_0(float *out, float p, const uint8_t *v, const uint16_t *d, int hd) {
#if defined(__AVX2__) && defined(__FMA__)
    for (int b = 0; b < hd / 32; b++) {
        __m128i lo, hi;
        unpack_q4_0_avx2(v + b * 16, &lo, &hi);
        const __m256 pd = _mm256_set1_ps(p * f16_to_f32(d[b]));
        float *ob = out + b * 32;
        _mm256_storeu_ps(ob, _mm256_fmadd_ps(pd, i8x8_ps(lo), _mm256_loadu_ps(ob)));
        _mm256_storeu_ps(ob + 8, _mm256_fmadd_ps(pd, i8x8_ps(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(ob + 8)));
        _mm256_storeu_ps(ob + 16, _mm256_fmadd_ps(pd, i8x8_ps(hi), _mm256_loadu_ps(ob + 16)));
        _mm256_storeu_ps(ob + 24, _mm256_fmadd_ps(pd, i8x8_ps(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(ob + 24)));
    }
#else
    int8_t t[32];
    for (int b = 0; b < hd / 32; b++) {
        unpack_q4_0(v + b * 16, t);
        axpy_i8(out + b * 32, p * f16_to_f32(d[b]), t, 32);
    }
#endif
}

static void store_kv(const pl_model *m, int layer, int pos, const float *k, const float *v) {
    const int hd = m->head_dim;
    for (int g = 0; g < m->n_kv; g++) {
        const size_t row = ((size_t)layer * m->n_kv + g) * m->capacity + pos;
        const float *ks = k + (size_t)g * hd, *vs = v + (size_t)g * hd;
        if (m->kv_type == 3) {
            quant_row_q8_0(ks, hd, (int8_t *)m->k + row * hd, (uint16_t *)m->k_scale + row * (hd / 32));
            quant_row_q8_0(vs, hd, (int8_t *)m->v + row * hd, (uint16_t *)m->v_scale + row * (hd / 32));
        } else if (m->kv_type == 4) {
            quant_row_q4_0(ks, hd, (uint8_t *)m->k + row * (hd / 2), (uint16_t *)m->k_scale + row * (hd / 32));
            quant_row_q4_0(vs, hd, (uint8_t *)m->v + row * (hd / 2), (uint16_t *)m->v_scale + row * (hd / 32));
        } else if (m->kv_type == 1) {
            uint16_t *kd = (uint16_t *)m->k + row * hd, *vd = (uint16_t *)m->v + row * hd;
            for (int i = 0; i < hd; i++) { kd[i] = f32_to_f16(ks[i]); vd[i] = f32_to_f16(vs[i]); }
        } else {
            int8_t *kd = (int8_t *)m->k + row * hd, *vd = (int8_t *)m->v + row * hd;
            float ka = 0.0f, va = 0.0f;
            for (int i = 0; i < hd; i++) { ka = fmaxf(ka, fabsf(ks[i])); va = fmaxf(va, fabsf(vs[i])); }
            const float kscale = ka / 127.0f, vscale = va / 127.0f;
            for (int i = 0; i < hd; i++) {
                kd[i] = (int8_t)(kscale > 0.0f ? nearbyintf(ks[i] / kscale) : 0.0f);
                vd[i] = (int8_t)(vscale > 0.0f ? nearbyintf(vs[i] / vscale) : 0.0f);
            }
            m->k_scale[row] = kscale; m->v_scale[row] = vscale;
        }
    }
}

typedef struct { const pl_model *m; int layer, lo, pos; } attn_job;

static void attention_head(void *p, int h) {
    const attn_job *a = p;
    const pl_model *m = a->m;
    const int layer = a->layer, lo = a->lo, pos = a->pos;
    const int hd = m->head_dim, group = m->n_heads / m->n_kv, n = pos - lo + 1;
    const float scale = 1.0f / sqrtf((float)hd);
    {
        const int g = h / group;
        const size_t base = ((size_t)layer * m->n_kv + g) * m->capacity;
        float *q = m->qkv + (size_t)h * hd, *sc = m->scores + (size_t)h * m->capacity, *out = m->att + (size_t)h * hd;
        float qr[512];
        for (int i = 0; i < hd; i++) qr[i] = m->kv_type == 1 ? round_f16(q[i]) : q[i];
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const size_t row = base + lo + j;
            float s;
            if (m->kv_type == 1) s = dot_f16((const uint16_t *)m->k + row * hd, qr, hd);
            else if (m->kv_type == 3)
                s = dot_q8_0((const int8_t *)m->k + row * hd, (const uint16_t *)m->k_scale + row * (hd / 32), qr, hd);
            else if (m->kv_type == 4)
                s = dot_q4_0((const uint8_t *)m->k + row * (hd / 2), (const uint16_t *)m->k_scale + row * (hd / 32),
                             qr, hd);
            else s = dot_i8((const int8_t *)m->k + row * hd, qr, hd) * m->k_scale[row];
            sc[j] = s * scale;
            if (sc[j] > mx) mx = sc[j];
        }
        const float inv = 1.0f / exp_shifted(sc, n, mx);
        for (int i = 0; i < hd; i++) out[i] = 0.0f;
        for (int j = 0; j < n; j++) {
            const size_t row = base + lo + j;
            const float p = sc[j] * inv;
            if (m->kv_type == 1) axpy_f16(out, p, (const uint16_t *)m->v + row * hd, hd);
            else if (m->kv_type == 3)
                axpy_q8_0(out, p, (const int8_t *)m->v + row * hd, (const uint16_t *)m->v_scale + row * (hd / 32), hd);
            else if (m->kv_type == 4)
                axpy_q4_0(out, p, (const uint8_t *)m->v + row * (hd / 2), (const uint16_t *)m->v_scale + row * (hd / 32),
                          hd);
            else axpy_i8(out, p * m->v_scale[row], (const int8_t *)m->v + row * hd, hd);
        }
    }
}

int pl_decode_step(const pl_model *m, float *x, int pos, int lo, const float *cos, const float *sin) {
    if (m->head_dim > 512 || ((m->kv_type == 3 || m->kv_type == 4) && m->head_dim % 32) || pos < 0 || pos >= m->capacity || lo < 0 || lo > pos) return -1;
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim;
    for (int l = 0; l < m->n_layers; l++) {
        const pl_layer *L = &m->layers[l];
        rmsnorm(x, L->attn_norm, m->hidden, m->eps, m->xn);
        matvec(m, &L->qkv, m->xn, m->qkv);
        float *q = m->qkv, *k = q + (size_t)H * hd, *v = k + (size_t)KV * hd;
        rope(q, H, hd, m->rotary_dim, cos, sin);
        rope(k, KV, hd, m->rotary_dim, cos, sin);
        store_kv(m, l, pos, k, v);
        attn_job aj = {m, l, lo, pos};
        if (pos - lo >= 64) parallel_run(attention_head, &aj, H);
        else for (int h = 0; h < H; h++) attention_head(&aj, h);
        matvec(m, &L->o, m->att, m->y);
        for (int i = 0; i < m->hidden; i++) x[i] += m->y[i];
        rmsnorm(x, L->ffn_norm, m->hidden, m->eps, m->xn);
        matvec(m, &L->gate_up, m->xn, m->gu);
        silu_row(m->gu, m->inter, m->hmid);
        matvec(m, &L->down, m->hmid, m->y);
        for (int i = 0; i < m->hidden; i++) x[i] += m->y[i];
    }
    return 0;
}

/* ---- one whole token in C: embedding row -> pl_decode_step -> final RMSNorm -> lm_head -> greedy pick ------
 *
 * pl_decode_token runs everything a single decoded token needs, so a small model (where the per-token work
 * outside the layers is a large share) pays no Python per token:
 *   x = row `token` of the embedding table, dequantized to f32 exactly as linear.py's dequantize_torch does
 *       (the same float products: Q4_0 d*(q-8), Q4_1 d*q+m, Q8_0 q*d, Q5_0 d*(q-16), Q5_1 d*q+m, IQ4_NL
 *       d*kvalues[q], Q4_K/Q5_K (d*sc)*q-(dmin*mn), Q6_K (d*sc)*(q-32); F32/F16/BF16 rows converted), read
 *       from the kernels' tile layout (a tied lm_head's weight) or from GGUF rows (an untied table);
 *       with PL_TOKEN_X_GIVEN the caller has put x in head->x already (a table type not read here);
 *   pl_decode_step(m, x, pos, lo, cos, sin); h = RMSNorm(x) * norm (f32, as rmsnorm above);
 *   logits = lm_head(h) on the kernels (q8 activations, as every kernels.py gemm), when lm_head.w is set;
 *   with PL_TOKEN_ARGMAX: returns the first index of the largest logit in [0, n_valid) (a NaN counts as the
 *   largest, as torch.argmax), else 0. A negative return is a refused input (-1 the step's checks, -2 token).
 * The Python side (engine/cpu.py FastDecoder) keeps sampling at temperature > 0 (torch's generator) and any
 * logit processor; the logits buffer is (16 * lm_head tiles) floats. */
#define EMB_F32 100
#define EMB_F16 101
#define EMB_BF16 102
#define PL_TOKEN_X_GIVEN 1
#define PL_TOKEN_ARGMAX 2
typedef struct {
    const uint8_t *embd; int embd_type, embd_tiles, vocab;  /* embd_tiles 1: kernels' tile layout, 0: GGUF rows */
    const float *norm;                                       /* final RMSNorm weight (hidden) */
    pl_mat lm_head;                                          /* w NULL: the caller runs lm_head on h */
    float *x, *h, *logits;                                   /* hidden, hidden, 16 * lm_head tiles */
    int n_valid;                                             /* the argmax runs over [0, n_valid) */
} pl_head;

static float h2f(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return f16_to_f32(v); }

/* the 32 codes of a 32-column block: low nibbles are columns 0..15, high nibbles 16..31 (GGUF order) */
static void nib32(const uint8_t *qs, int *q) { for (int j = 0; j < 16; j++) { q[j] = qs[j] & 15; q[j + 16] = qs[j] >> 4; } }

static void block32_values(int kind, const int *q, float d, float m, float *o) {
    for (int j = 0; j < QK; j++) {
        switch (kind) {
            case KIND_Q4_0: o[j] = d * (float)(q[j] - 8); break;
            case KIND_Q5_0: o[j] = d * (float)(q[j] - 16); break;
            case KIND_Q8_0: o[j] = (float)q[j] * d; break;
            case KIND_IQ4_NL: o[j] = d * (float)IQ4NL[q[j]]; break;
            default: { const float t = d * (float)q[j]; o[j] = t + m; }  /* Q4_1, Q5_1: two roundings */
        }
    }
}

/* one super-block of Q4_K/Q5_K (codes q[256], 6-bit sc[8], mn[8]) or Q6_K (q[256] 0..63, int8 sc[16]) */
static void superblock_values(int kind, const int *q, const int *sc, const int *mn, float d, float dmin, float *o) {
    if (kind == KIND_Q6_K) {
        for (int g = 0; g < 16; g++) {
            const float dsc = d * (float)sc[g];
            for (int k = 0; k < 16; k++) o[16 * g + k] = dsc * (float)(q[16 * g + k] - 32);
        }
        return;
    }
    for (int j = 0; j < 8; j++) {
        const float ds = d * (float)sc[j], dm = dmin * (float)mn[j];
        for (int k = 0; k < 32; k++) { const float t = ds * (float)q[32 * j + k]; o[32 * j + k] = t - dm; }
    }
}

/* row `row` of a kernels' tile matrix with `cols` columns -> f32 (layouts in this file's header) */
static void tile_row_values(int kind, const uint8_t *w, int cols, int row, float *out) {
    const int t = row / TILE, r = row % TILE;
    int q[QKK], sc[16], mn[8];
    if (is_k(kind)) {
        const int nsb = cols / QKK;
        const size_t bsz = kblock_bytes(kind), o = k45_off(kind);
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *bp = w + ((size_t)t * nsb + sb) * bsz;
            for (int j = 0; j < 8; j++)
                for (int c = 0; c < 4; c++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t byte = bp[j * 256 + (c * TILE + r) * 4 + i];
                        q[32 * j + 4 * c + i] = byte & 15;
                        q[32 * j + 16 + 4 * c + i] = byte >> 4;
                        if (kind == KIND_Q5_K) {
                            const uint8_t h = bp[K5_HB + j * 64 + r * 4 + i];
                            q[32 * j + 4 * c + i] |= ((h >> c) & 1) << 4;
                            q[32 * j + 16 + 4 * c + i] |= ((h >> (4 + c)) & 1) << 4;
                        } else if (kind == KIND_Q6_K) {
                            const uint8_t h0 = bp[K6_HB + j * 128 + r * 4 + i], h1 = bp[K6_HB + j * 128 + 64 + r * 4 + i];
                            q[32 * j + 4 * c + i] |= ((h0 >> (2 * c)) & 3) << 4;
                            q[32 * j + 16 + 4 * c + i] |= ((h1 >> (2 * c)) & 3) << 4;
                        }
                    }
            if (kind == KIND_Q6_K) {
                for (int g = 0; g < 16; g++) sc[g] = (int8_t)bp[K6_SC + g * TILE + r];
                superblock_values(kind, q, sc, mn, h2f(bp + K6_D + 2 * r), 0.0f, out + (size_t)sb * QKK);
            } else {
                for (int j = 0; j < 8; j++) { sc[j] = bp[o + K4_SC + j * TILE + r]; mn[j] = bp[o + K4_MN + j * TILE + r]; }
                superblock_values(kind, q, sc, mn, h2f(bp + o + K4_D + 2 * r), h2f(bp + o + K4_DMIN + 2 * r),
                                  out + (size_t)sb * QKK);
            }
        }
        return;
    }
    const int nb = cols / QK;
    const size_t bs = block_bytes(kind), doff = d_off(kind);
    for (int b = 0; b < nb; b++) {
        const uint8_t *bp = w + ((size_t)t * nb + b) * bs;
        if (kind == KIND_Q8_0) {
            for (int c = 0; c < 8; c++)
                for (int i = 0; i < 4; i++) q[4 * c + i] = (int)bp[(c * TILE + r) * 4 + i] - 128;
        } else {
            for (int c = 0; c < 4; c++)
                for (int i = 0; i < 4; i++) {
                    const uint8_t byte = bp[(c * TILE + r) * 4 + i];
                    const int hb = is_q5(kind) ? bp[256 + r * 4 + i] : 0;
                    q[4 * c + i] = (byte & 15) | (((hb >> c) & 1) << 4);
                    q[16 + 4 * c + i] = (byte >> 4) | (((hb >> (4 + c)) & 1) << 4);
                }
        }
        block32_values(kind, q, h2f(bp + doff + 2 * r), has_m(kind) ? h2f(bp + doff + 32 + 2 * r) : 0.0f,
                       out + (size_t)b * QK);
    }
}

/* bytes of one GGUF row of `cols` values */
static size_t gguf_row_bytes(int type, int cols) {
    switch (type) {
        case EMB_F32: return (size_t)cols * 4;
        case EMB_F16: case EMB_BF16: return (size_t)cols * 2;
        case KIND_Q4_0: case KIND_IQ4_NL: return (size_t)cols / QK * 18;
        case KIND_Q4_1: return (size_t)cols / QK * 20;
        case KIND_Q8_0: return (size_t)cols / QK * 34;
        case KIND_Q5_0: return (size_t)cols / QK * 22;
        case KIND_Q5_1: return (size_t)cols / QK * 24;
        case KIND_Q4_K: return (size_t)cols / QKK * 144;
        case KIND_Q5_K: return (size_t)cols / QKK * 176;
        case KIND_Q6_K: return (size_t)cols / QKK * 210;
        default: return 0;
    }
}

/* row `row` of a GGUF-layout table (rows of blocks as the file stores them, or F32/F16/BF16) -> f32 */
static int gguf_row_values(int type, const uint8_t *w, int cols, int row, float *out) {
    const size_t rb = gguf_row_bytes(type, cols);
    if (rb == 0) return -1;
    const uint8_t *p = w + (size_t)row * rb;
    int q[QKK], sc[16], mn[8];
    if (type == EMB_F32) { memcpy(out, p, (size_t)cols * 4); return 0; }
    if (type == EMB_F16) { for (int i = 0; i < cols; i++) out[i] = h2f(p + 2 * i); return 0; }
    if (type == EMB_BF16) {
        for (int i = 0; i < cols; i++) { uint16_t v; memcpy(&v, p + 2 * i, 2); uint32_t u = (uint32_t)v << 16; memcpy(out + i, &u, 4); }
        return 0;
    }
    if (is_k(type)) {
        const size_t bsz = type == KIND_Q4_K ? 144 : (type == KIND_Q5_K ? 176 : 210);
        for (int sb = 0; sb < cols / QKK; sb++) {
            const uint8_t *b = p + (size_t)sb * bsz;
            float *o = out + (size_t)sb * QKK;
            if (type == KIND_Q6_K) {  /* ql[128] | qh[64] | int8 sc[16] | f16 d */
                for (int n = 0; n < 2; n++)
                    for (int l = 0; l < 64; l++) {
                        q[128 * n + l] = b[64 * n + l] & 15;
                        q[128 * n + 64 + l] = b[64 * n + l] >> 4;
                    }
                for (int n = 0; n < 2; n++)
                    for (int s = 0; s < 4; s++)
                        for (int l = 0; l < 32; l++) q[128 * n + 32 * s + l] |= ((b[128 + 32 * n + l] >> (2 * s)) & 3) << 4;
                for (int g = 0; g < 16; g++) sc[g] = (int8_t)b[192 + g];
                superblock_values(type, q, sc, mn, h2f(b + 208), 0.0f, o);
                continue;
            }
            const uint8_t *s = b + 4;  /* f16 d | f16 dmin | 12 B scales | (Q5_K: qh[32]) | qs[128] */
            for (int j = 0; j < 4; j++) {
                sc[j] = s[j] & 63; mn[j] = s[4 + j] & 63;
                sc[4 + j] = (s[8 + j] & 15) | ((s[j] >> 6) << 4);
                mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 6) << 4);
            }
            const uint8_t *qs = b + bsz - 128;
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < 32; l++) { q[64 * c + l] = qs[32 * c + l] & 15; q[64 * c + 32 + l] = qs[32 * c + l] >> 4; }
            if (type == KIND_Q5_K)
                for (int j = 0; j < 8; j++)
                    for (int l = 0; l < 32; l++) q[32 * j + l] |= ((b[16 + l] >> j) & 1) << 4;
            superblock_values(type, q, sc, mn, h2f(b), h2f(b + 2), o);
        }
        return 0;
    }
    const size_t bsz = gguf_row_bytes(type, QK);
    for (int bi = 0; bi < cols / QK; bi++) {
        const uint8_t *b = p + (size_t)bi * bsz;
        float m = 0.0f;
        if (type == KIND_Q8_0) {
            for (int j = 0; j < QK; j++) q[j] = (int8_t)b[2 + j];
        } else if (is_q5(type)) {
            const int o = type == KIND_Q5_0 ? 2 : 4;
            const uint32_t qh = (uint32_t)b[o] | (uint32_t)b[o + 1] << 8 | (uint32_t)b[o + 2] << 16 | (uint32_t)b[o + 3] << 24;
            nib32(b + o + 4, q);
            for (int j = 0; j < QK; j++) q[j] |= (int)((qh >> j) & 1) << 4;
        } else {
            nib32(b + (type == KIND_Q4_1 ? 4 : 2), q);
        }
        if (has_m(type)) m = h2f(b + 2);
        block32_values(type, q, h2f(b), m, out + (size_t)bi * QK);
    }
    return 0;
}

/* row `row` of an embedding table as pl_decode_token reads it (for tests): 0, or -1 for a type it cannot read */
int pl_embed_row(const uint8_t *w, int type, int tiles, int cols, int row, float *out) {
    if (tiles) {
        if (type < 0 || type > KIND_IQ4_NL || cols % (is_k(type) ? QKK : QK)) return -1;
        tile_row_values(type, w, cols, row, out);
        return 0;
    }
    if (type >= 0 && type <= KIND_IQ4_NL && cols % (is_k(type) ? QKK : QK)) return -1;
    return gguf_row_values(type, w, cols, row, out);
}

int pl_decode_token(const pl_model *m, const pl_head *hd, int token, int pos, int lo, const float *cos,
                    const float *sin, int flags) {
    if (!(flags & PL_TOKEN_X_GIVEN)) {
        if (token < 0 || token >= hd->vocab) return -2;
        if (pl_embed_row(hd->embd, hd->embd_type, hd->embd_tiles, m->hidden, token, hd->x) != 0) return -1;
    }
    if (pl_decode_step(m, hd->x, pos, lo, cos, sin) != 0) return -1;
    rmsnorm(hd->x, hd->norm, m->hidden, m->eps, hd->h);
    if (hd->lm_head.w == NULL) return 0;
    matvec(m, &hd->lm_head, hd->h, hd->logits);
    if (!(flags & PL_TOKEN_ARGMAX)) return 0;
    const float *l = hd->logits;
    int best = 0;
    float bv = l[0];
    if (bv != bv) return 0;
    for (int i = 1; i < hd->n_valid; i++) {
        const float v = l[i];
        if (v != v) return i;
        if (v > bv) { bv = v; best = i; }
    }
    return best;
}

/* ---- memory bandwidth: read `bytes` `reps` times with all threads (the roofline's denominator) ----------- */

typedef struct { const uint8_t *buf; size_t bytes, chunk; int64_t sums[1024]; } bw_job;

static void bw_chunk(void *p, int c) {
    bw_job *b = p;
    const size_t lo = (size_t)c * b->chunk, hi = lo + b->chunk < b->bytes ? lo + b->chunk : b->bytes;
    int64_t sum = 0;
#if defined(__AVX2__)
    __m256i acc = _mm256_setzero_si256();
    for (size_t i = lo; i + 64 <= hi; i += 64) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(b->buf + i));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(b->buf + i + 32));
        acc = _mm256_add_epi64(acc, _mm256_xor_si256(a, x));
    }
    sum = _mm256_extract_epi64(acc, 0) + _mm256_extract_epi64(acc, 1) + _mm256_extract_epi64(acc, 2) +
          _mm256_extract_epi64(acc, 3);
#else
    for (size_t i = lo; i + 8 <= hi; i += 64) { int64_t v; memcpy(&v, b->buf + i, 8); sum += v; }
#endif
    b->sums[c] = sum;
}

double pl_read_bandwidth(const uint8_t *buf, size_t bytes, int reps) {
    static bw_job b;
    double total = 0.0;
    b.buf = buf; b.bytes = bytes; b.chunk = (bytes + 1023) / 1024;
    b.chunk = (b.chunk + 63) / 64 * 64;
    const int n = (int)((bytes + b.chunk - 1) / b.chunk);
    for (int r = 0; r < reps; r++) {
        parallel_run(bw_chunk, &b, n);
        for (int c = 0; c < n; c++) total += (double)b.sums[c];
    }
    return total;
}

/* ---- batched decode: B sequences, one new token each, every layer in one call -------------------------------
 *
 * The arithmetic of pl_decode_step for each of B rows of a serving slot cache, with the weight matrices applied
 * to all B rows at once: the B rows' activations are quantized as above and pl_gemm runs them as T = B tokens
 * (each weight tile is read once per step for the whole batch, and each row's result is the same as alone:
 * the tile loops keep one accumulation order per token, so a row's output does not depend on B or the thread
 * count). Per row: its cache slot, the position its new key/value is stored at, the first visible key (the
 * sliding window) and its own rotary row (cos/sin: the row's LongRoPE factor set and position). Attention runs
 * as B * n_heads independent (row, head) jobs.
 * KV layout (the serving SlotKVCache): codes (layers, slots, n_kv, capacity, head_dim [/2 for q4_0]) as
 * kv_type 0 f32, 1 f16, 2 int8 (+ f32 scale per (layer, slot, head, position)), 3 q8_0 / 4 q4_0 (+ f16 scales
 * (layers, slots, n_kv, capacity, head_dim/32)); the types and their rounding as pl_decode_step's. f16 rounds
 * the queries to f16 (as pl_decode_step); f32 and the quantized types keep f32 queries.
 * Then, as pl_decode_token's tail, optionally the final RMSNorm and lm_head for the B rows (pl_batch.norm,
 * .lm_head), so a row's logits equal pl_decode_token's for the same cache type bit for bit.
 * Only the pl_model fields that describe the network (sizes, eps, layers) are read; its cache and scratch
 * pointers are not used. Returns 0, or -1 for an argument out of range (nothing is written then). */
typedef struct {
    int B, kv_type, slots, capacity, max_keys;  /* max_keys: >= pos - lo + 1 of every row (scores per job) */
    const int32_t *slot, *pos, *lo;             /* (B,) */
    void *k, *v, *k_scale, *v_scale;            /* the slot cache (layout above) */
    const float *cos, *sin;                     /* (B, rotary_dim) */
    /* scratch, row-major (B, width): xn hidden, qkv pad16((H + 2 KV) hd), att H hd, gu pad16(2 inter),
     * hmid inter, y pad16(hidden); scores (B * H, max_keys); activation codes qa (B, widest) int8,
     * da / sa_f (B, widest / 32) f32, sa_i (B, widest / 32) i32 (widest = max(hidden, inter, H hd)) */
    float *xn, *qkv, *att, *gu, *hmid, *y, *scores;
    int8_t *qa; float *da, *sa_f; int32_t *sa_i;
    /* the tail, as pl_decode_token's: h = RMSNorm(x) * norm (B, hidden), then logits = lm_head(h)
     * (B, pad16(lm_head rows)) on the kernels. norm NULL: stop after the layers; lm_head.w NULL: after h. */
    const float *norm;
    pl_mat lm_head;
    float *h, *logits;
} pl_batch;

static int pad16(int n) { return (n + TILE - 1) / TILE * TILE; }

static size_t kv_row_bytes(int kv_type, int hd) {
    return kv_type == 0 ? (size_t)hd * 4 : kv_type == 1 ? (size_t)hd * 2 : kv_type == 4 ? (size_t)hd / 2 : (size_t)hd;
}

static float dot_f32(const float *k, const float *q, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(q + i), acc);
    float t[8]; _mm256_storeu_ps(t, acc);
    s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
#endif
    for (; i < n; i++) s += k[i] * q[i];
    return s;
}

static void axpy_f32(float *out, float p, const float *v, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 pv = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
#endif
    for (; i < n; i++) out[i] += p * v[i];
}

/* head row `row` (an index over (layers, slots, n_kv, capacity)) of one store: store / dot / axpy */
static void kvb_store(int kv_type, void *c, void *sc, size_t row, int hd, const float *x) {
    uint8_t *dst = (uint8_t *)c + row * kv_row_bytes(kv_type, hd);
    if (kv_type == 0) memcpy(dst, x, (size_t)hd * 4);
    else if (kv_type == 1) for (int i = 0; i < hd; i++) ((uint16_t *)dst)[i] = f32_to_f16(x[i]);
    else if (kv_type == 3) quant_row_q8_0(x, hd, (int8_t *)dst, (uint16_t *)sc + row * (hd / 32));
    else if (kv_type == 4) quant_row_q4_0(x, hd, dst, (uint16_t *)sc + row * (hd / 32));
    else {  /* int8: amax/127, half to even (store_kv) */
        float a = 0.0f;
        for (int i = 0; i < hd; i++) a = fmaxf(a, fabsf(x[i]));
        const float s = a / 127.0f;
        for (int i = 0; i < hd; i++) ((int8_t *)dst)[i] = (int8_t)(s > 0.0f ? nearbyintf(x[i] / s) : 0.0f);
        ((float *)sc)[row] = s;
    }
}

static float kvb_dot(int kv_type, const void *c, const void *sc, size_t row, int hd, const float *q) {
    const uint8_t *src = (const uint8_t *)c + row * kv_row_bytes(kv_type, hd);
    switch (kv_type) {
    case 0: return dot_f32((const float *)src, q, hd);
    case 1: return dot_f16((const uint16_t *)src, q, hd);
    case 3: return dot_q8_0((const int8_t *)src, (const uint16_t *)sc + row * (hd / 32), q, hd);
    case 4: return dot_q4_0(src, (const uint16_t *)sc + row * (hd / 32), q, hd);
    default: return dot_i8((const int8_t *)src, q, hd) * ((const float *)sc)[row];
    }
}

static void kvb_axpy(int kv_type, const void *c, const void *sc, size_t row, int hd, float p, float *out) {
    const uint8_t *src = (const uint8_t *)c + row * kv_row_bytes(kv_type, hd);
    switch (kv_type) {
    case 0: axpy_f32(out, p, (const float *)src, hd); break;
    case 1: axpy_f16(out, p, (const uint16_t *)src, hd); break;
    case 3: axpy_q8_0(out, p, (const int8_t *)src, (const uint16_t *)sc + row * (hd / 32), hd); break;
    case 4: axpy_q4_0(out, p, src, (const uint16_t *)sc + row * (hd / 32), hd); break;
    default: axpy_i8(out, p * ((const float *)sc)[row], (const int8_t *)src, hd);
    }
}

#if defined(__F16C__) && defined(__FMA__)
/* The f16 cache's attention for one (row, head) over n consecutive key/value rows (hd % 32 == 0), with the
 * arithmetic of dot_f16 / axpy_f16 key by key (the same fmadds in the same order, the same horizontal sum), so
 * the result is bit-identical to the kvb_dot / kvb_axpy loop: four keys' dot chains run interleaved, and the
 * output is accumulated in registers 32 dims at a time instead of loaded and stored once per key. */
static float hsum8_f16dot(__m256 acc) {  /* dot_f16's reduction order */
    float t[8]; _mm256_storeu_ps(t, acc);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

static void dots_f16(const uint16_t *k, const float *q, int n, int hd, float scale, float *sc) {
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const uint16_t *k0 = k + (size_t)t * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < hd; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k0 + i))), qv, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k0 + hd + i))), qv, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k0 + 2 * hd + i))), qv, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k0 + 3 * hd + i))), qv, a3);
        }
        sc[t] = hsum8_f16dot(a0) * scale; sc[t + 1] = hsum8_f16dot(a1) * scale;
        sc[t + 2] = hsum8_f16dot(a2) * scale; sc[t + 3] = hsum8_f16dot(a3) * scale;
    }
    for (; t < n; t++) sc[t] = dot_f16(k + (size_t)t * hd, q, hd) * scale;
}

static void axpys_f16(const uint16_t *v, const float *sc, float inv, int n, int hd, float *out) {
    for (int c = 0; c < hd; c += 32) {
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        const uint16_t *vc = v + c;
        for (int t = 0; t < n; t++, vc += hd) {
            const __m256 pv = _mm256_set1_ps(sc[t] * inv);
            o0 = _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)vc)), o0);
            o1 = _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vc + 8))), o1);
            o2 = _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vc + 16))), o2);
            o3 = _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vc + 24))), o3);
        }
        _mm256_storeu_ps(out + c, o0); _mm256_storeu_ps(out + c + 8, o1);
        _mm256_storeu_ps(out + c + 16, o2); _mm256_storeu_ps(out + c + 24, o3);
    }
}

/* the 8 sums of a[0..7]'s lanes, each in hsum8_f16dot's order ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)) */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* prefetch bytes [from, to) of p (clipped to `end`), a cache line at a time: the next job's key or value rows,
 * asked for a few lines at a time while this job computes (a burst of a whole job's lines fills the load queue
 * and stalls the core until they arrive) */
static inline __attribute__((always_inline)) void prefetch_span(const void *p, size_t from, size_t to, size_t end) {
    if (p == NULL) return;
    to = to < end ? to : end;
    for (size_t o = from; o < to; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T1);
}

/* 8 int8 codes as 8 floats (exact) */
static inline __m256 cvt8_i8(const int8_t *p) {
#if defined(__AVX2__)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else  /* AVX without AVX2: two 4-lane widenings (the grouped q8_0 path itself needs AVX2: HAVE_Q8_ROWS) */
    const __m128i x = _mm_loadl_epi64((const __m128i *)p);
    const __m128i lo = _mm_cvtepi8_epi32(x), hi = _mm_cvtepi8_epi32(_mm_srli_si128(x, 4));
    return _mm256_cvtepi32_ps(_mm256_insertf128_si256(_mm256_castsi128_si256(lo), hi, 1));
#endif
}

/* 8 cache values of a row from column i as floats: f16 (Q8 = 0) or q8_0 codes (Q8 = 1, the block scale apart) */
static inline __attribute__((always_inline)) __m256 kv_chunk(const int Q8, const uint8_t *row, int i) {
    return Q8 ? cvt8_i8((const int8_t *)row + i) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
}

/* The scores of the G query heads of one key/value group (G a constant after inlining, 1..4) against n keys of an
 * f16 cache (Q8 = 0: dot_f16 per key) or a q8_0 cache (Q8 = 1: dot_q8_0 per key, kd the keys' f16 block scales,
 * hd / 32 a row), times `scale`. KB keys at a time, the G x KB dot products side by side in registers
 * (AVX-512VL's 32 vector registers hold 3 heads x 8 keys; AVX2's 16 hold 3 x 4), each key chunk converted once,
 * straight from the cache row, for the G heads; each head's KB sums reduced together by hsum8x8 (4 keys: their
 * vectors twice, the first 4 sums kept). f16: one chain over the row. q8_0: one chain per 32-value block, each
 * block's sum times the key's block scale and added to the key's total (mul, then add: dot_q8_0's `s += dot * d`
 * without contraction). Every chain and sum is the per-key function's (the same fmadds in the same order, the same
 * additions), so each score is bit-identical to it. q: G rows of hd (hd <= 512, hd % 32 == 0); sc: G rows of ld.
 * pk, pk_bytes: the next job's key rows, prefetched KB rows per KB rows computed (NULL: none). ~2x the version
 * that converted 8 key rows into a buffer first and read them back per head. */
static inline __attribute__((always_inline)) void
dots_heads(const int Q8, const int G, const void *k, const uint16_t *kd, const float *q, int n, int hd,
           float scale, float *sc, size_t ld, const void *pk, size_t pk_bytes) {
#if defined(__AVX512VL__)
    enum { KB = 8 };
#else
    enum { KB = 4 };
#endif
    const int nb = hd / 32, blk = Q8 ? 32 : hd;  /* values summed before a block scale (f16: the row, none) */
    const size_t rb = (size_t)hd * (Q8 ? 1 : 2);  /* bytes of a key row */
    const __m256 vs = _mm256_set1_ps(scale);
    int t = 0;
    for (; t + KB <= n; t += KB) {
        const uint8_t *kt = (const uint8_t *)k + t * rb;
        prefetch_span(pk, t * rb, (t + KB) * rb, pk_bytes);
        __m256 s[4];
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) s[g] = _mm256_setzero_ps();
        for (int b0 = 0; b0 < hd; b0 += blk) {
            __m256 a[4][8];
#pragma GCC unroll 4
            for (int g = 0; g < G; g++)
#pragma GCC unroll 8
                for (int u = 0; u < KB; u++) a[g][u] = _mm256_setzero_ps();
#pragma GCC unroll 4
            for (int i = b0; i < b0 + blk; i += 8) {
                __m256 qv[4];
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) qv[g] = _mm256_loadu_ps(q + (size_t)g * hd + i);
#pragma GCC unroll 8
                for (int u = 0; u < KB; u++) {
                    const __m256 kv = kv_chunk(Q8, kt + u * rb, i);
#pragma GCC unroll 4
                    for (int g = 0; g < G; g++) a[g][u] = _mm256_fmadd_ps(kv, qv[g], a[g][u]);
                }
            }
            __m256 dv = _mm256_setzero_ps();
            if (Q8) {
                float dk[8];
                for (int u = 0; u < 8; u++) dk[u] = f16_to_f32(kd[(size_t)(t + u % KB) * nb + b0 / 32]);
                dv = _mm256_loadu_ps(dk);
            }
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m256 h8[8] = {a[g][0], a[g][1], a[g][2], a[g][3], a[g][0], a[g][1], a[g][2], a[g][3]};
                const __m256 h = hsum8x8(KB == 8 ? a[g] : h8);
                s[g] = Q8 ? _mm256_add_ps(s[g], _mm256_mul_ps(h, dv)) : h;
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) {
            if (KB == 8) _mm256_storeu_ps(sc + g * ld + t, _mm256_mul_ps(s[g], vs));
            else _mm_storeu_ps(sc + g * ld + t, _mm256_castps256_ps128(_mm256_mul_ps(s[g], vs)));
        }
    }
    prefetch_span(pk, t * rb, pk_bytes, pk_bytes);
    for (; t < n; t++)
        for (int g = 0; g < G; g++) {
            const uint8_t *row = (const uint8_t *)k + t * rb;
            const float *qg = q + (size_t)g * hd;
            sc[g * ld + t] = (Q8 ? dot_q8_0((const int8_t *)row, kd + (size_t)t * nb, qg, hd)
                                 : dot_f16((const uint16_t *)row, qg, hd)) * scale;
        }
}

/* The weighted sums of the G heads of a group over n value rows of an f16 (Q8 = 0: axpy_f16 per row) or q8_0
 * cache (Q8 = 1: axpy_q8_0 per row, vd the rows' f16 block scales): out[g] = sum over t of p[g][t] * v[t], each
 * value chunk loaded and converted once for the G heads. p: the probabilities sc * inv, already multiplied
 * (axpys_f16's sc[t] * inv); q8_0 takes p * d per row and block, as axpy_q8_0 does. Each output's chain is the
 * per-row function's (fmadds over the rows in order from 0), so it is bit-identical. AVX-512VL: 32 columns (a
 * q8_0 block) of the G heads at a time (4G accumulators), else 16. pv, pv_bytes: the next job's value rows,
 * prefetched a row per row of the first pass (NULL: none). */
static inline __attribute__((always_inline)) void
axpys_heads(const int Q8, const int G, const void *v, const uint16_t *vd, const float *p, size_t ld, int n, int hd,
            float *out, const void *pv, size_t pv_bytes) {
    const int nb = hd / 32;
    const size_t rb = (size_t)hd * (Q8 ? 1 : 2);  /* bytes of a value row */
#if defined(__AVX512VL__)
    enum { E = 4 };  /* 8-column vectors per head and pass */
#else
    enum { E = 2 };
#endif
    for (int c = 0; c < hd; c += 8 * E) {
        __m256 o[4][E];
#pragma GCC unroll 4
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int e = 0; e < E; e++) o[g][e] = _mm256_setzero_ps();
        const uint8_t *vt = v;
        for (int t = 0; t < n; t++, vt += rb) {
            if (c == 0) prefetch_span(pv, t * rb, (t + 1) * rb, pv_bytes);
            __m256 x[E];
#pragma GCC unroll 4
            for (int e = 0; e < E; e++) x[e] = kv_chunk(Q8, vt, c + 8 * e);
            const float d = Q8 ? f16_to_f32(vd[(size_t)t * nb + c / 32]) : 1.0f;
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m256 pg = _mm256_set1_ps(Q8 ? p[g * ld + t] * d : p[g * ld + t]);
#pragma GCC unroll 4
                for (int e = 0; e < E; e++) o[g][e] = _mm256_fmadd_ps(pg, x[e], o[g][e]);
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int e = 0; e < E; e++) _mm256_storeu_ps(out + (size_t)g * hd + c + 8 * e, o[g][e]);
        if (c == 0) prefetch_span(pv, (size_t)n * rb, pv_bytes, pv_bytes);  /* a longer next job's last rows */
    }
}
#if defined(__AVX2__)
#define HAVE_Q8_ROWS 1  /* dot_i8 / axpy_i8, which the q8_0 grouped path must equal, are vector code with AVX2 only */
#endif
#define HAVE_F16_ROWS 1
#endif

typedef struct { const pl_model *m; const pl_batch *b; int layer, per; } batch_attn_job;  /* per: see attention_group */

/* job j = (row j / H, head j % H): softmax(q.K / sqrt(hd)) V over the row's visible keys [lo, pos] */
/* the cache row of position 0 of row r's key/value group g in `layer` (the slot cache's layout, above) */
static size_t slot_row0(const pl_batch *b, int layer, int KV, int r, int g) {
    return (((size_t)layer * b->slots + b->slot[r]) * KV + g) * b->capacity;
}

/* x (n values) rounded to f16 and back (round_f16: round to nearest even), 8 at a time where F16C is there */
static void round_f16_n(const float *x, int n, float *out) {
    int i = 0;
#ifdef HAVE_F16_ROWS
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; i < n; i++) out[i] = round_f16(x[i]);
}

static void batch_attention(void *p, int j) {
    const batch_attn_job *a = p;
    const pl_model *m = a->m;
    const pl_batch *b = a->b;
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, r = j / H, h = j % H;
    const int lo = b->lo[r], n = b->pos[r] - lo + 1, g = h / (H / KV);
    const size_t base = slot_row0(b, a->layer, KV, r, g) + lo;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *q = b->qkv + (size_t)r * pad16((H + 2 * KV) * hd) + (size_t)h * hd;
    float *sc = b->scores + (size_t)j * b->max_keys, *out = b->att + (size_t)r * H * hd + (size_t)h * hd;
    float qr[512];
#ifdef HAVE_F16_ROWS
    const int f16_rows = b->kv_type == 1 && hd % 32 == 0;
#endif
    if (b->kv_type == 1) round_f16_n(q, hd, qr);
    else memcpy(qr, q, (size_t)hd * 4);
    float mx = -INFINITY;
#ifdef HAVE_F16_ROWS
    if (f16_rows) dots_f16((const uint16_t *)b->k + base * hd, qr, n, hd, scale, sc);
    else
#endif
    for (int t = 0; t < n; t++) sc[t] = kvb_dot(b->kv_type, b->k, b->k_scale, base + t, hd, qr) * scale;
    for (int t = 0; t < n; t++) if (sc[t] > mx) mx = sc[t];
    const float inv = 1.0f / exp_shifted(sc, n, mx);
#ifdef HAVE_F16_ROWS
    if (f16_rows) { axpys_f16((const uint16_t *)b->v + base * hd, sc, inv, n, hd, out); return; }
#endif
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int t = 0; t < n; t++) kvb_axpy(b->kv_type, b->v, b->v_scale, base + t, hd, sc[t] * inv, out);
}

/* RoPE of row r's query heads of key/value group g and of its key, then the key and value stored at the row's
 * position: the part of ROW_ROPE_STORE that group g's attention needs (rope and the stores are per head) */
static void rope_store_group(const pl_model *m, const pl_batch *b, int layer, int r, int g) {
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, rd = m->rotary_dim, G = H / KV;
    float *q = b->qkv + (size_t)r * pad16((H + 2 * KV) * hd), *k = q + (size_t)H * hd, *v = k + (size_t)KV * hd;
    const float *cos = b->cos + (size_t)r * rd, *sin = b->sin + (size_t)r * rd;
    rope(q + (size_t)g * G * hd, G, hd, rd, cos, sin);
    rope(k + (size_t)g * hd, 1, hd, rd, cos, sin);
    const size_t row = slot_row0(b, layer, KV, r, g) + b->pos[r];
    kvb_store(b->kv_type, b->k, b->k_scale, row, hd, k + (size_t)g * hd);
    kvb_store(b->kv_type, b->v, b->v_scale, row, hd, v + (size_t)g * hd);
}

#ifdef HAVE_F16_ROWS
/* the largest of s[0..n), NaNs skipped (-inf when there is none): the scalar loop's `if (s[t] > mx) mx = s[t]`, 8
 * lanes at a time (max_ps(v, m) keeps m where v is NaN; where +0 meets -0 either may win, and e^(s - mx) is the
 * same for both) */
static float max_scores(const float *s, int n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) m = _mm256_max_ps(_mm256_loadu_ps(s + t), m);
    float l[8], mx = -INFINITY;
    _mm256_storeu_ps(l, m);
    for (int i = 0; i < 8; i++) if (l[i] > mx) mx = l[i];
    for (; t < n; t++) if (s[t] > mx) mx = s[t];
    return mx;
}

/* job j = (row j / KV, key/value group j % KV) of an f16 or q8_0 cache (hd % 32 == 0, 2..4 query heads per
 * group): the group's RoPE and stores (rope_store_group), then the attention of its G query heads over the row's
 * visible keys, each key and value row read once for the G heads (dots_heads / axpys_heads). Each head's
 * result is batch_attention's, bit for bit. */
static inline __attribute__((always_inline)) void attention_group_g(const int G, const batch_attn_job *a, int j,
                                                                    int next) {
    const pl_model *m = a->m;
    const pl_batch *b = a->b;
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, r = j / KV, g = j % KV;
    const int lo = b->lo[r], n = b->pos[r] - lo + 1, h0 = g * G;
    const size_t base = slot_row0(b, a->layer, KV, r, g) + lo;
    rope_store_group(m, b, a->layer, r, g);
    /* the keys and values of job `next` (this thread's next one, or -1), asked for while this one computes */
    const size_t rb = kv_row_bytes(b->kv_type, hd);
    const uint8_t *pk = NULL, *pv = NULL;
    size_t pbytes = 0;
    if (next >= 0) {
        const int r2 = next / KV, g2 = next % KV, lo2 = b->lo[r2];
        const size_t base2 = slot_row0(b, a->layer, KV, r2, g2) + lo2;
        pk = (const uint8_t *)b->k + base2 * rb;
        pv = (const uint8_t *)b->v + base2 * rb;
        pbytes = (size_t)(b->pos[r2] - lo2 + 1) * rb;
    }
    const float scale = 1.0f / sqrtf((float)hd);
    const float *q = b->qkv + (size_t)r * pad16((H + 2 * KV) * hd) + (size_t)h0 * hd;
    const size_t ld = b->max_keys;
    float *sc = b->scores + ((size_t)r * H + h0) * ld, *out = b->att + (size_t)r * H * hd + (size_t)h0 * hd;
    const uint8_t *k = (const uint8_t *)b->k + base * rb, *v = (const uint8_t *)b->v + base * rb;
#ifdef HAVE_Q8_ROWS
    const int q8 = b->kv_type == 3;  /* int8 codes, with f16 block scales in k_scale / v_scale (hd / 32 a row) */
#else
    const int q8 = 0;
#endif
    if (q8) {
        dots_heads(1, G, k, (const uint16_t *)b->k_scale + base * (hd / 32), q, n, hd, scale, sc, ld, pk, pbytes);
    } else {
        float qr[4 * 512];
        round_f16_n(q, G * hd, qr);
        dots_heads(0, G, k, NULL, qr, n, hd, scale, sc, ld, pk, pbytes);
    }
    for (int h = 0; h < G; h++) {  /* softmax: probabilities sc * inv in place */
        float *s = sc + h * ld;
        const float mx = max_scores(s, n);
        const float inv = 1.0f / exp_shifted(s, n, mx);
        int t = 0;
        for (; t + 8 <= n; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(inv)));
        for (; t < n; t++) s[t] *= inv;
    }
    if (q8) axpys_heads(1, G, v, (const uint16_t *)b->v_scale + base * (hd / 32), sc, ld, n, hd, out, pv, pbytes);
    else axpys_heads(0, G, v, NULL, sc, ld, n, hd, out, pv, pbytes);
}

/* whether the batched step runs attention_group (RoPE, stores and attention per (row, group) in one job) */
static int grouped_attention_ok(const pl_model *m, const pl_batch *b) {
    const int G = m->n_heads / m->n_kv;
#ifdef HAVE_Q8_ROWS
    const int kv_ok = b->kv_type == 1 || b->kv_type == 3;
#else
    const int kv_ok = b->kv_type == 1;
#endif
    return kv_ok && m->head_dim % 32 == 0 && G >= 2 && G <= 4;
}

/* chunk c: jobs [c * per, (c + 1) * per) of the B * KV (row, group) jobs, in order, so that each job's successor
 * runs on the same thread and its keys and values are prefetched into this core's caches */
static void attention_group(void *p, int c) {
    const batch_attn_job *a = p;
    const int n = a->b->B * a->m->n_kv, j0 = c * a->per, j1 = j0 + a->per < n ? j0 + a->per : n;
    for (int j = j0; j < j1; j++) {
        const int next = j + 1 < j1 ? j + 1 : -1;
        switch (a->m->n_heads / a->m->n_kv) {
        case 2: attention_group_g(2, a, j, next); break;
        case 3: attention_group_g(3, a, j, next); break;
        case 4: attention_group_g(4, a, j, next); break;
        default: break;  /* not chosen: grouped_attention_ok */
        }
    }
}
#endif

static void batch_attention_row(void *p, int r) {  /* every head of row r: the same jobs, in one */
    const batch_attn_job *a = p;
    const int H = a->m->n_heads;
    for (int h = 0; h < H; h++) batch_attention(p, r * H + h);
}

/* row r of x (B, w->cols) quantized into the batch's activation codes for w's kind: the row job of
 * pl_quantize_act / pl_quantize_act_k (quant_chunk / quant_k_chunk) for that row alone (w a plain kernels kind,
 * not KIND_PARTS) */
static void quantize_act_row(const pl_batch *b, const pl_mat *w, const float *x, int r) {
    if (is_k(w->kind)) {
        const quant_k_job q = {x, w->cols, b->qa, b->da, (int16_t *)b->sa_i};
        quant_k_chunk((void *)&q, r);
    } else {
        const quant_job q = {x, w->cols, b->qa, b->da, b->sa_i, b->sa_f};
        quant_chunk((void *)&q, r);
    }
}

/* y (B, pad16(w->rows)) = x (B, w->cols) @ W.T for the B rows at once; `quantized`: the rows' activation codes
 * for w are in the batch's buffers already (the row job before it wrote them: row_work's `next`) */
static void batch_matmul_q(const pl_batch *b, const pl_mat *w, const float *x, float *y, int quantized) {
    if (w->kind == KIND_PARTS) {  /* row blocks of different kinds (see pl_mat_check) */
        parts_product(w, x, b->B, y, pad16(w->rows), b->qa, b->da, b->sa_i, b->sa_f);
        return;
    }
    if (!quantized && is_k(w->kind)) pl_quantize_act_k(x, b->B, w->cols, b->qa, b->da, (int16_t *)b->sa_i);
    else if (!quantized) pl_quantize_act(x, b->B, w->cols, b->qa, b->da, b->sa_i, b->sa_f);
    const int tiles = (w->rows + TILE - 1) / TILE;
    pl_gemm(w->kind, w->w, tiles, w->cols, b->qa, b->da, b->sa_i, b->sa_f, b->B, y, tiles * TILE, 0);
}

static void batch_matmul(const pl_batch *b, const pl_mat *w, const float *x, float *y) {
    batch_matmul_q(b, w, x, y, 0);
}

/* ---- greedy picks for a batch: argmax of each row ----------------------------------------------------------
 * out[r] = the first index of the largest value of row r (x + r * ld, V values), as torch.argmax: a NaN counts
 * as the largest (the first NaN wins), ties go to the lowest index, -0.0 == 0.0. Rows are split over the
 * threads; every ISA path gives the same index (the comparisons are exact). */
typedef struct { const float *x; int V; long ld; int32_t *out; } argmax_job;

static int32_t argmax_row(const float *x, int V) {
    int i = 0;
    float mx = -INFINITY;
    int nan = 0;
#if defined(__AVX512F__)
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= V; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
        m = _mm512_max_ps(m, v);
    }
    mx = _mm512_reduce_max_ps(m);
#elif defined(__AVX2__)
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= V; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0;
        m = _mm256_max_ps(m, v);
    }
    float t[8]; _mm256_storeu_ps(t, m);
    for (int j = 0; j < 8; j++) mx = t[j] > mx ? t[j] : mx;
#endif
    for (; i < V; i++) {
        if (x[i] != x[i]) nan = 1;
        else if (x[i] > mx) mx = x[i];
    }
    if (nan) {
        for (i = 0; i < V; i++) if (x[i] != x[i]) return i;
    }
    i = 0;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(mx);
    for (; i + 16 <= V; i += 16) {
        const __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), mv, _CMP_EQ_OQ);
        if (k) return i + __builtin_ctz(k);
    }
#elif defined(__AVX2__)
    const __m256 mv = _mm256_set1_ps(mx);
    for (; i + 8 <= V; i += 8) {
        const int k = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
        if (k) return i + __builtin_ctz(k);
    }
#endif
    for (; i < V; i++) if (x[i] == mx) return i;
    return 0;  /* unreachable: mx is one of the values */
}

static void argmax_chunk(void *p, int r) {
    const argmax_job *a = p;
    a->out[r] = argmax_row(a->x + (size_t)r * a->ld, a->V);
}

void pl_argmax_rows(const float *x, int B, int V, long ld, int32_t *out) {
    if (B <= 0 || V <= 0) return;
    argmax_job a = {x, V, ld, out};
    if ((long)B * V >= 65536) parallel_run(argmax_chunk, &a, B);
    else for (int r = 0; r < B; r++) argmax_chunk(&a, r);
}

/* The per-row work between the matrix products, one job per row (rows split over the threads; a row's own
 * arithmetic is what the serial loop did, so the result does not depend on the split). `next`: the matrix the
 * op's output goes into, whose activation codes the job writes too while the row is in cache (quantize_act_row:
 * the same codes pl_quantize_act would write), so that product needs no pass of its own; NULL: none. */
enum { ROW_NORM, ROW_ROPE_STORE, ROW_RESIDUAL_NORM, ROW_SILU, ROW_RESIDUAL };
typedef struct {
    const pl_model *m; const pl_batch *b; float *x; int layer, op; const float *w; float *out; const pl_mat *next;
} row_job;

static void row_work(void *p, int r) {
    const row_job *j = p;
    const pl_model *m = j->m;
    const pl_batch *b = j->b;
    const int D = m->hidden;
    float *xr = j->x + (size_t)r * D;
    switch (j->op) {
    case ROW_RESIDUAL_NORM:  /* x += y (o or down); then the next norm */
    case ROW_RESIDUAL: {
        const float *y = b->y + (size_t)r * pad16(D);
        for (int i = 0; i < D; i++) xr[i] += y[i];
        if (j->op == ROW_RESIDUAL) break;
    }   /* fall through */
    case ROW_NORM:
        rmsnorm(xr, j->w, D, m->eps, j->out + (size_t)r * D);
        if (j->next != NULL) quantize_act_row(b, j->next, j->out, r);
        break;
    case ROW_ROPE_STORE:
        for (int g = 0; g < m->n_kv; g++) rope_store_group(m, b, j->layer, r, g);
        break;
    case ROW_SILU: {
        silu_row(b->gu + (size_t)r * pad16(2 * m->inter), m->inter, b->hmid + (size_t)r * m->inter);
        if (j->next != NULL) quantize_act_row(b, j->next, b->hmid, r);
        break;
    }
    }
}

static void rows_run(const pl_model *m, const pl_batch *b, float *x, int layer, int op, const float *w, float *out,
                     const pl_mat *next) {
    row_job j = {m, b, x, layer, op, w, out, next};
    parallel_rows(row_work, &j, b->B);  /* B == 1: inline */
}

/* the `next` of a row job feeding matrix w: w itself, or NULL for a KIND_PARTS matrix (its parts quantize for
 * their own kinds: parts_product) */
static const pl_mat *fuse_quant(const pl_mat *w) { return w->kind == KIND_PARTS ? NULL : w; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* layer l's RoPE, key/value stores and attention for every row (keys: the rows' visible keys in all): one job
 * per (row, key/value group) where attention_group applies and there are enough such jobs for the threads (one
 * or two rows alone have 3 groups, say, for 2 threads: per-head jobs share out better), else the RoPE rows then
 * per (row, head) jobs */
static void batch_attention_layer(const pl_model *m, const pl_batch *b, float *x, int l, long keys) {
    const int H = m->n_heads, B = b->B, serial = keys * H < 64 * 4;
    batch_attn_job aj = {m, b, l, 1};
#ifdef HAVE_F16_ROWS
    if (grouped_attention_ok(m, b) && (serial || B * m->n_kv >= 4 * g_threads)) {  /* enough jobs to share out */
        const int n = B * m->n_kv;
        /* ~4 chunks a thread (load balance on a busy machine), or one chunk of all jobs when serial */
        aj.per = serial ? n : (n + 4 * g_threads - 1) / (4 * g_threads);
        parallel_run(attention_group, &aj, (n + aj.per - 1) / aj.per);
        return;
    }
#endif
    rows_run(m, b, x, l, ROW_ROPE_STORE, NULL, NULL, NULL);
    if (serial) for (int j = 0; j < B * H; j++) batch_attention(&aj, j);
    else if (B >= 4 * g_threads) parallel_run(batch_attention_row, &aj, B);  /* fewer, larger jobs */
    else parallel_run(batch_attention, &aj, B * H);
}

/* seconds pl_decode_batch spent in its parts since the last reset: [0] the layers' matrix products (activation
 * quantization of the attention output included), [1] RoPE, key/value stores and attention, [2] the element-wise
 * rows (with the activation codes of the products they feed), [3] lm_head */
static double g_decode_s[4];

int pl_decode_batch(const pl_model *m, const pl_batch *b, float *x /* (B, hidden), updated in place */) {
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, D = m->hidden, B = b->B;
    if (B < 1 || hd > 512 || KV < 1 || H % KV || !kv_type_ok(b->kv_type, hd) || !fused_layers_ok(m)) return -1;
    for (int r = 0; r < B; r++)
        if (b->slot[r] < 0 || b->slot[r] >= b->slots || b->pos[r] < 0 || b->pos[r] >= b->capacity || b->lo[r] < 0 ||
            b->lo[r] > b->pos[r] || b->pos[r] - b->lo[r] + 1 > b->max_keys)
            return -1;
    if (b->norm != NULL && b->lm_head.w != NULL && b->lm_head.cols != D) return -1;
    long keys = 0;
    for (int r = 0; r < B; r++) keys += b->pos[r] - b->lo[r] + 1;
    double t0 = now_s(), t1;
#define LAP(i) (t1 = now_s(), g_decode_s[i] += t1 - t0, t0 = t1)
    /* the norms and the SiLU write the activation codes of the product they feed (row_work's `next`) */
    rows_run(m, b, x, 0, ROW_NORM, m->layers[0].attn_norm, b->xn, fuse_quant(&m->layers[0].qkv));
    LAP(2);
    for (int l = 0; l < m->n_layers; l++) {
        const pl_layer *L = &m->layers[l];
        batch_matmul_q(b, &L->qkv, b->xn, b->qkv, fuse_quant(&L->qkv) != NULL);
        LAP(0);
        batch_attention_layer(m, b, x, l, keys);
        LAP(1);
        batch_matmul(b, &L->o, b->att, b->y);
        LAP(0);
        rows_run(m, b, x, l, ROW_RESIDUAL_NORM, L->ffn_norm, b->xn, fuse_quant(&L->gate_up));
        LAP(2);
        batch_matmul_q(b, &L->gate_up, b->xn, b->gu, fuse_quant(&L->gate_up) != NULL);
        LAP(0);
        rows_run(m, b, x, l, ROW_SILU, NULL, NULL, fuse_quant(&L->down));
        LAP(2);
        batch_matmul_q(b, &L->down, b->hmid, b->y, fuse_quant(&L->down) != NULL);
        LAP(0);
        if (l + 1 < m->n_layers) {
            const pl_layer *N = &m->layers[l + 1];
            rows_run(m, b, x, l, ROW_RESIDUAL_NORM, N->attn_norm, b->xn, fuse_quant(&N->qkv));
        }
        else rows_run(m, b, x, l, ROW_RESIDUAL, NULL, NULL, NULL);
        LAP(2);
    }
    if (b->norm == NULL) return 0;
    const pl_mat *head = b->lm_head.w != NULL ? fuse_quant(&b->lm_head) : NULL;
    rows_run(m, b, x, 0, ROW_NORM, b->norm, b->h, head);
    LAP(2);
    if (b->lm_head.w != NULL) batch_matmul_q(b, &b->lm_head, b->h, b->logits, head != NULL);
    LAP(3);
#undef LAP
    return 0;
}

void pl_decode_batch_profile(double *out, int reset) {
    for (int i = 0; i < 4; i++) { out[i] = g_decode_s[i]; if (reset) g_decode_s[i] = 0.0; }
}

/* ---- a prompt chunk of one sequence in C: T tokens through every layer, attention flash-style -------------
 *
 * pl_prefill runs T consecutive tokens (positions start .. start+T-1) of one sequence through all layers of
 * `m`, storing their keys and values in m's cache (the pl_decode_step layout and types: 1 f16, 2 int8,
 * 3 q8_0, 4 q4_0, stored exactly as store_kv, and 0 f32 for a float32 core cache) and updating the residual stream x (T, hidden) in place. It is
 * the arithmetic of model.py's forward over a chunk with a cache (what engine/generate.py's prefill runs):
 * per layer RMSNorm (f32, as rmsnorm above) -> qkv on the kernels (every row's activations quantized as
 * pl_gemm's callers do, so a row's products do not depend on T) -> rotate-half RoPE with each position's own
 * cos/sin row -> keys/values of all T rows stored -> causal attention over the cached keys [lo, pos] of each
 * row (lo: the sliding window) -> o_proj + residual -> RMSNorm -> gate_up -> up * silu(gate) -> down +
 * residual. The caller applies the final norm and lm_head to the rows it needs.
 *
 * Attention is blocked (flash attention: an online softmax over blocks of FA_BK keys, no T x L score matrix),
 * vectorized across 16 queries of one head: queries are transposed and pre-scaled by 1/sqrt(head_dim), each
 * block of keys/values is read from the cache once per group of queries and converted to f32 (f16 exactly;
 * int8/q8_0/q4_0 dequantized as pocketlm.kvcache.dequantize: code * scale), scores, maxima, exponentials,
 * sums and the weighted values are f32. Keys outside a query's [lo, pos] get probability exactly 0 and blocks
 * start at multiples of FA_BK, so a query's result does not depend on T, the chunking or the threads. The
 * vector code uses GCC vector extensions (16 floats: one zmm, two ymm or four xmm) with FMA contraction, so the
 * AVX-512, AVX2 and plain x86-64 builds differ only in float rounding. */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
#define FA_BK 64
#if defined(__AVX512F__)
#define FA_NQ 4   /* query vectors (16 queries each) per group: 4 x 4 accumulators in the 32 zmm registers */
#else
#define FA_NQ 1   /* 1 x 4 accumulators of two ymm each: 8 of the 16 ymm registers (two vectors would spill) */
#endif
#define FA_QG (FA_NQ * 16)
#define FAST_MATH __attribute__((optimize("fp-contract=fast")))
#define V16 static inline __attribute__((always_inline, optimize("fp-contract=fast")))
#pragma GCC diagnostic ignored "-Wpsabi"  /* static helpers only: the vector ABI never crosses the library */

V16 v16f v16_splat(float a) { return (v16f){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
V16 v16f v16_load(const float *p) { v16f v; memcpy(&v, p, 64); return v; }
#define v16_store(p, v) do { const v16f v_ = (v); memcpy((p), &v_, 64); } while (0)
#if defined(__AVX512F__)  /* keep a loaded vector in a register: GCC would fold its load into every FMA using it */
#define V16_REG(x) __asm__("" : "+v"(x))
#else
#define V16_REG(x) ((void)0)
#endif
#define V16_MAX(a, b) ({ const v16f a_ = (a), b_ = (b); const v16i gt_ = a_ > b_; \
                        (v16f)((gt_ & (v16i)a_) | (~gt_ & (v16i)b_)); })

/* e^x per lane (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp): exactly 1 at 0 and
 * exactly 0 below -87.3 (e^-inf = 0) */
V16 v16f v16_exp(const v16f *px) {  /* by pointer: a 64-byte vector argument draws GCC's ABI note off AVX-512 */
    v16f x = *px;
    const v16i tiny = x < v16_splat(-87.3f);
    const v16i big = x > v16_splat(88.0f);
    x = (v16f)((~big & (v16i)x) | (big & (v16i)v16_splat(88.0f)));
    x = (v16f)((~tiny & (v16i)x) | (tiny & (v16i)v16_splat(0.0f)));
    const v16f magic = v16_splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer (half to even) */
    const v16f n = (x * v16_splat(1.44269504088896341f) + magic) - magic;
    const v16f r = (x - n * v16_splat(0.693359375f)) - n * v16_splat(-2.12194440e-4f);
    v16f p = v16_splat(1.9875691500e-4f);
    p = p * r + v16_splat(1.3981999507e-3f);
    p = p * r + v16_splat(8.3334519073e-3f);
    p = p * r + v16_splat(4.1665795894e-2f);
    p = p * r + v16_splat(1.6666665459e-1f);
    p = p * r + v16_splat(5.0000001201e-1f);
    const v16f y = p * (r * r) + r + v16_splat(1.0f);
    const v16i e = __builtin_convertvector(n, v16i) << 23;
    return (v16f)(((v16i)y + e) & ~tiny);
}

/* hm[i] = up[i] * silu(gate[i]) for the fused gate_up row gu = (gate (n), up (n)): 16 lanes at a time (v16_exp),
 * the tail with expf. One function for the decode step, the batched step and the prompt chunks, so that a
 * position's activations are computed the same way on every path. */
static FAST_MATH void silu_row(const float *gu, int n, float *hm) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const v16f gate = v16_load(gu + i), ng = -gate;
        v16_store(hm + i, v16_load(gu + n + i) * (gate / (v16_splat(1.0f) + v16_exp(&ng))));
    }
    for (; i < n; i++) {
        const float gate = gu[i];
        hm[i] = gu[n + i] * (gate / (1.0f + expf(-gate)));
    }
}

/* sc[t] = e^(sc[t] - mx) for t < n, 16 at a time with v16_exp (the tail through a vector padded with -inf, whose
 * lanes come out 0, so every entry gets the same function); returns their sum: 16 lane sums, then those in a
 * fixed order. The softmax of every decode path (the single step's attention_head and the batched step's), so a
 * row's probabilities do not depend on the path. */
static FAST_MATH float exp_shifted(float *sc, int n, float mx) {
    const v16f m = v16_splat(mx);
    v16f acc = v16_splat(0.0f);
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        const v16f x = v16_load(sc + t) - m, e = v16_exp(&x);
        v16_store(sc + t, e);
        acc += e;
    }
    if (t < n) {
        float buf[16];
        for (int i = 0; i < 16; i++) buf[i] = t + i < n ? sc[t + i] : -INFINITY;
        const v16f x = v16_load(buf) - m, e = v16_exp(&x);
        v16_store(buf, e);
        memcpy(sc + t, buf, (size_t)(n - t) * 4);
        acc += e;
    }
    float l[16];
    v16_store(l, acc);
    return (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))) +
           (((l[8] + l[9]) + (l[10] + l[11])) + ((l[12] + l[13]) + (l[14] + l[15])));
}

/* rows [j0, j0 + n) of head row block `base` (an index over (layers, n_kv, capacity)) as f32 (n, hd) */
static void kv_rows_f32(int kv_type, const void *c, const void *sc, size_t base, int hd, int n, float *out) {
    for (int j = 0; j < n; j++) {
        const size_t row = base + (size_t)j;
        const uint8_t *src = (const uint8_t *)c + row * kv_row_bytes(kv_type, hd);
        float *o = out + (size_t)j * hd;
        if (kv_type == 0) { memcpy(o, src, (size_t)hd * 4); continue; }
        if (kv_type == 1) {
            int i = 0;
#if defined(__F16C__)
            for (; i + 8 <= hd; i += 8)
                _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
#endif
            for (; i < hd; i++) { uint16_t h; memcpy(&h, src + 2 * i, 2); o[i] = f16_to_f32(h); }
        } else if (kv_type == 2) {
            const float s = ((const float *)sc)[row];
            for (int i = 0; i < hd; i++) o[i] = (float)((const int8_t *)src)[i] * s;
        } else {
            const uint16_t *d = (const uint16_t *)sc + row * (hd / 32);
            for (int b = 0; b < hd / 32; b++) {
                const float s = f16_to_f32(d[b]);
                if (kv_type == 3) {
                    for (int i = 0; i < 32; i++) o[32 * b + i] = (float)((const int8_t *)src)[32 * b + i] * s;
                } else {
                    for (int i = 0; i < 16; i++) {
                        const uint8_t byte = src[16 * b + i];
                        o[32 * b + i] = (float)((int)(byte & 15) - 8) * s;
                        o[32 * b + 16 + i] = (float)((int)(byte >> 4) - 8) * s;
                    }
                }
            }
        }
    }
}

typedef struct {
    const pl_model *m;
    int layer, T, start, window, ldq, groups, nq;  /* nq: query vectors of 16 per group (fa_plan) */
    const float *qkv;  /* (T, ldq): q of head h at column h * hd */
    float *att;        /* (T, H * hd) */
    _Atomic int failed;  /* a thread could not allocate its scratch */
} fa_job;

static _Thread_local float *fa_buf = NULL;
static _Thread_local size_t fa_cap = 0;

/* job = (head, group of FA_QG queries): softmax(q K^T / sqrt(hd)) V over each query's visible keys */
V16 void flash_nq(fa_job *a, int job, const int NQ) {
    const pl_model *m = a->m;
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, T = a->T;
    const int h = job / a->groups, i0 = (job % a->groups) * (NQ * 16), g = h / (H / KV);
    const size_t need = (size_t)FA_NQ * hd * 16 * 2 + (size_t)FA_NQ * FA_BK * 16 + (size_t)FA_BK * hd * 2;
    if (fa_cap < need) {
        free(fa_buf);
        fa_buf = aligned_alloc(64, (need * 4 + 63) / 64 * 64);
        fa_cap = fa_buf ? need : 0;
        if (!fa_buf) { atomic_store(&a->failed, 1); return; }
    }
    float *QT = fa_buf, *OT = QT + (size_t)NQ * hd * 16, *S = OT + (size_t)NQ * hd * 16;
    float *Kf = S + (size_t)NQ * FA_BK * 16, *Vf = Kf + (size_t)FA_BK * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    int qp[FA_QG], lo[FA_QG];
    for (int u = 0; u < (NQ * 16); u++) {
        const int i = i0 + u < T ? i0 + u : T - 1;  /* lanes past the chunk repeat its last row (not written) */
        qp[u] = a->start + i;
        lo[u] = a->window > 0 && qp[u] - a->window + 1 > 0 ? qp[u] - a->window + 1 : 0;
        const float *q = a->qkv + (size_t)i * a->ldq + (size_t)h * hd;
        for (int d = 0; d < hd; d++) QT[((size_t)(u / 16) * hd + d) * 16 + u % 16] = q[d] * scale;
    }
    v16f mx[FA_NQ], l[FA_NQ], qpv[FA_NQ], lov[FA_NQ];
    for (int v = 0; v < NQ; v++) {
        mx[v] = v16_splat(-3.4028235e38f); l[v] = v16_splat(0.0f);
        for (int u = 0; u < 16; u++) { qpv[v][u] = (float)qp[16 * v + u]; lov[v][u] = (float)lo[16 * v + u]; }
    }
    memset(OT, 0, (size_t)NQ * hd * 16 * 4);
    const int kend = qp[(NQ * 16) - 1] + 1, qmin = qp[0];
    int lomax = 0;
    for (int u = 0; u < (NQ * 16); u++) lomax = lo[u] > lomax ? lo[u] : lomax;
    const size_t base = ((size_t)a->layer * KV + g) * m->capacity;
    for (int kb = lo[0] / FA_BK * FA_BK; kb < kend; kb += FA_BK) {
        const int nk = kend - kb < FA_BK ? kend - kb : FA_BK;
        kv_rows_f32(m->kv_type, m->k, m->k_scale, base + kb, hd, nk, Kf);
        kv_rows_f32(m->kv_type, m->v, m->v_scale, base + kb, hd, nk, Vf);
        /* scores S[v][j] = q . k_j for the FA_NQ query vectors, 4 keys at a time */
        int j = 0;
        for (; j + 4 <= nk; j += 4) {
            v16f acc[FA_NQ][4];
            for (int v = 0; v < NQ; v++) for (int jj = 0; jj < 4; jj++) acc[v][jj] = v16_splat(0.0f);
            const float *k0 = Kf + (size_t)j * hd;
            for (int d = 0; d < hd; d++) {
                const float c0 = k0[d], c1 = k0[hd + d], c2 = k0[2 * hd + d], c3 = k0[3 * hd + d];
                for (int v = 0; v < NQ; v++) {
                    v16f q = v16_load(QT + ((size_t)v * hd + d) * 16);
                    V16_REG(q);
                    acc[v][0] += q * c0; acc[v][1] += q * c1; acc[v][2] += q * c2; acc[v][3] += q * c3;
                }
            }
            for (int v = 0; v < NQ; v++)
                for (int jj = 0; jj < 4; jj++) v16_store(S + ((size_t)v * FA_BK + j + jj) * 16, acc[v][jj]);
        }
        for (; j < nk; j++) {
            v16f acc[FA_NQ];
            for (int v = 0; v < NQ; v++) acc[v] = v16_splat(0.0f);
            const float *k0 = Kf + (size_t)j * hd;
            for (int d = 0; d < hd; d++)
                for (int v = 0; v < NQ; v++) acc[v] += v16_load(QT + ((size_t)v * hd + d) * 16) * k0[d];
            for (int v = 0; v < NQ; v++) v16_store(S + ((size_t)v * FA_BK + j) * 16, acc[v]);
        }
        /* mask (causal and window), online softmax: P = e^(S - new max), O *= e^(old max - new max) */
        const int masked = kb + nk - 1 > qmin || kb < lomax;
        for (int v = 0; v < NQ; v++) {
            float *Sv = S + (size_t)v * FA_BK * 16;
            v16f nm = mx[v];
            for (int jj = 0; jj < nk; jj++) {
                v16f s = v16_load(Sv + (size_t)jj * 16);
                if (masked) {
                    const v16f kp = v16_splat((float)(kb + jj));
                    const v16i vis = (kp <= qpv[v]) & (kp >= lov[v]);
                    s = (v16f)((vis & (v16i)s) | (~vis & (v16i)v16_splat(-INFINITY)));
                    v16_store(Sv + (size_t)jj * 16, s);
                }
                nm = V16_MAX(nm, s);
            }
            const v16f dm = mx[v] - nm, alpha = v16_exp(&dm);
            v16f sum = v16_splat(0.0f);
            for (int jj = 0; jj < nk; jj++) {
                const v16f sm = v16_load(Sv + (size_t)jj * 16) - nm, e = v16_exp(&sm);
                v16_store(Sv + (size_t)jj * 16, e);
                sum += e;
            }
            l[v] = l[v] * alpha + sum;
            mx[v] = nm;
            float *Ov = OT + (size_t)v * hd * 16;
            for (int d = 0; d < hd; d++) v16_store(Ov + (size_t)d * 16, v16_load(Ov + (size_t)d * 16) * alpha);
        }
        /* O[v][d] += sum_j P[v][j] * V[j][d], 4 dims at a time */
        int d = 0;
        for (; d + 4 <= hd; d += 4) {
            v16f acc[FA_NQ][4];
            for (int v = 0; v < NQ; v++)
                for (int dd = 0; dd < 4; dd++) acc[v][dd] = v16_load(OT + ((size_t)v * hd + d + dd) * 16);
            for (int jj = 0; jj < nk; jj++) {
                const float *vr = Vf + (size_t)jj * hd + d;
                const float c0 = vr[0], c1 = vr[1], c2 = vr[2], c3 = vr[3];
                for (int v = 0; v < NQ; v++) {
                    v16f pj = v16_load(S + ((size_t)v * FA_BK + jj) * 16);
                    V16_REG(pj);
                    acc[v][0] += pj * c0; acc[v][1] += pj * c1; acc[v][2] += pj * c2; acc[v][3] += pj * c3;
                }
            }
            for (int v = 0; v < NQ; v++)
                for (int dd = 0; dd < 4; dd++) v16_store(OT + ((size_t)v * hd + d + dd) * 16, acc[v][dd]);
        }
        for (; d < hd; d++)
            for (int v = 0; v < NQ; v++) {
                v16f acc = v16_load(OT + ((size_t)v * hd + d) * 16);
                for (int jj = 0; jj < nk; jj++)
                    acc += v16_load(S + ((size_t)v * FA_BK + jj) * 16) * Vf[(size_t)jj * hd + d];
                v16_store(OT + ((size_t)v * hd + d) * 16, acc);
            }
    }
    for (int u = 0; u < (NQ * 16) && i0 + u < T; u++) {
        const int v = u / 16;
        const float inv = 1.0f / l[v][u % 16];
        float *out = a->att + (size_t)(i0 + u) * H * hd + (size_t)h * hd;
        for (int d = 0; d < hd; d++) out[d] = OT[((size_t)v * hd + d) * 16 + u % 16] * inv;
    }
}

/* job = (head, group of nq * 16 queries): the vector count fitted to the chunk (a short chunk, e.g. a new message
 * after a cached conversation, does not compute FA_NQ * 16 query lanes); a query's result does not depend on
 * it (lanes are independent, blocks start at multiples of FA_BK, fully masked blocks add exactly nothing) */
static FAST_MATH void flash_group(void *p, int job) {
    fa_job *a = p;
#if FA_NQ > 1
    if (a->nq == 1) flash_nq(a, job, 1);
    else if (a->nq == 2) flash_nq(a, job, 2);
    else flash_nq(a, job, FA_NQ);
#else
    flash_nq(a, job, 1);
#endif
}

/* the query vectors per group (1, 2 or FA_NQ; always 1 where FA_NQ is 1) and the groups per head for a chunk of
 * T queries */
static void fa_plan(int T, int *nq, int *groups) {
    const int v = (T + 15) / 16;
    *nq = v <= 1 || FA_NQ == 1 ? 1 : v <= 2 ? 2 : FA_NQ;
    *groups = (T + *nq * 16 - 1) / (*nq * 16);
}

/* pl_prefill's attention alone (for tests): queries q (T, ldq) (head h at column h * hd) of positions start ..
 * start+T-1 against layer `layer` of m's cache, which must hold their keys/values already -> att (T, H * hd).
 * 0, -1 for an argument out of range, -2 out of memory. */
int pl_attention(const pl_model *m, int layer, int T, int start, int window, const float *q, int ldq, float *att) {
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim;
    if (T < 1 || hd > 512 || KV < 1 || H % KV || !kv_type_ok(m->kv_type, hd) || layer < 0 ||
        layer >= m->n_layers || start < 0 || start + T > m->capacity || window < 0 || ldq < H * hd)
        return -1;
    int nq, groups;
    fa_plan(T, &nq, &groups);
    fa_job fj = {m, layer, T, start, window, ldq, groups, nq, q, att, 0};
    parallel_run(flash_group, &fj, H * groups);
    return atomic_load(&fj.failed) ? -2 : 0;
}

/* y (T, pad16(w->rows)) = x (T, w->cols) @ W.T */
static void rows_matmul(const pl_mat *w, const float *x, int T, float *y, int8_t *qa, float *da, int32_t *sa_i,
                        float *sa_f) {
    if (w->kind == KIND_PARTS) { parts_product(w, x, T, y, pad16(w->rows), qa, da, sa_i, sa_f); return; }
    if (is_k(w->kind)) pl_quantize_act_k(x, T, w->cols, qa, da, (int16_t *)sa_i);
    else pl_quantize_act(x, T, w->cols, qa, da, sa_i, sa_f);
    const int tiles = (w->rows + TILE - 1) / TILE;
    pl_gemm(w->kind, w->w, tiles, w->cols, qa, da, sa_i, sa_f, T, y, tiles * TILE, 0);
}

typedef struct {
    const pl_model *m;
    int layer, ldq, ldg, ldy, op;
    const float *w;
    float *x, *xn, *qkv, *gu, *hmid, *y;
} prefill_job;

enum { PF_NORM = 0, PF_SILU = 2, PF_RESIDUAL = 3, PF_RESIDUAL_NORM = 4 };

/* the element-wise work of one row t of a prompt chunk */
static FAST_MATH void prefill_row(void *p, int t) {
    const prefill_job *r = p;
    const pl_model *m = r->m;
    const int D = m->hidden;
    if (r->op == PF_SILU) {
        silu_row(r->gu + (size_t)t * r->ldg, m->inter, r->hmid + (size_t)t * m->inter);
        return;
    }
    if (r->op == PF_RESIDUAL || r->op == PF_RESIDUAL_NORM) {  /* x += y (o or down) */
        float *x = r->x + (size_t)t * D;
        const float *y = r->y + (size_t)t * r->ldy;
        for (int i = 0; i < D; i++) x[i] += y[i];
    }
    if (r->op == PF_NORM || r->op == PF_RESIDUAL_NORM)
        rmsnorm(r->x + (size_t)t * D, r->w, D, m->eps, r->xn + (size_t)t * D);
}

typedef struct {
    int T, start, window;      /* window 0: every earlier key is visible; else keys with pos - key < window */
    const float *cos, *sin;    /* (T, rotary_dim): each position's rotary row */
    /* scratch, row-major (T, width): xn hidden, qkv pad16((H + 2 KV) hd), att H hd, gu pad16(2 inter),
     * hmid inter, y pad16(max(hidden, H hd)); activation codes qa (T, widest) int8, da / sa_f (T, widest / 32)
     * f32, sa_i (T, widest / 32) i32 (widest = max(hidden, inter, H hd)) */
    float *xn, *qkv, *att, *gu, *hmid, *y;
    int8_t *qa; float *da, *sa_f; int32_t *sa_i;
} pl_chunk;

/* seconds pl_prefill spent in its parts since the last reset: [0] matrix products (activation quantization
 * included), [1] attention, [2] the element-wise rows (norms, RoPE + cache store, SiLU, residuals) */
static double g_prefill_s[3];

void pl_prefill_profile(double *out, int reset) {
    for (int i = 0; i < 3; i++) { out[i] = g_prefill_s[i]; if (reset) g_prefill_s[i] = 0.0; }
}

/* One prompt chunk of each of n sequences in one pass (the serving engine's batched prefill): segment s is
 * segs[s].T consecutive tokens of its own sequence, at positions start.., with its own cache (segs[s].m: the
 * shared weights bound to that sequence's keys/values) and rotary rows. The rows of all segments are stacked in
 * x (sum of T, hidden) and c's scratch, so every matrix product runs once over all of them; RoPE, the cache
 * stores and attention use each row's own segment. Each row's arithmetic is the one-segment call's (activation
 * codes per row, attention per query), so a prompt's keys, values and outputs do not depend on what it was
 * batched with. c->T, start, window, cos and sin are not read. */
typedef struct { const pl_model *m; int T, start, window; const float *cos, *sin; } pl_seg;

static int seg_of(const int *off, int n, int t) {  /* the segment holding row t: off[s] <= t < off[s + 1] */
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (off[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

typedef struct { const pl_seg *segs; const int *off; int n, layer, ldq; float *qkv; } seg_rope_job;

/* row t: rotate its q and k (its own position's cos/sin row) and store its keys/values in its segment's cache */
static FAST_MATH void seg_rope_store(void *p, int t) {
    const seg_rope_job *r = p;
    const int s = seg_of(r->off, r->n, t), lt = t - r->off[s];
    const pl_seg *g = &r->segs[s];
    const pl_model *m = g->m;
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, rd = m->rotary_dim;
    float *q = r->qkv + (size_t)t * r->ldq, *k = q + (size_t)H * hd, *v = k + (size_t)KV * hd;
    const float *cs = g->cos + (size_t)lt * rd, *sn = g->sin + (size_t)lt * rd;
    rope(q, H, hd, rd, cs, sn);
    rope(k, KV, hd, rd, cs, sn);
    for (int h = 0; h < KV; h++) {
        const size_t row = ((size_t)r->layer * KV + h) * m->capacity + (size_t)(g->start + lt);
        kvb_store(m->kv_type, m->k, m->k_scale, row, hd, k + (size_t)h * hd);
        kvb_store(m->kv_type, m->v, m->v_scale, row, hd, v + (size_t)h * hd);
    }
}

typedef struct { fa_job *jobs; const int *joff; int n; } seg_fa_job;

static void seg_flash(void *p, int job) {  /* job: (segment, head, query group), segments' jobs stacked */
    const seg_fa_job *a = p;
    const int s = seg_of(a->joff, a->n, job);
    flash_group(&a->jobs[s], job - a->joff[s]);
}

int pl_prefill_segs(const pl_seg *segs, int n, const pl_chunk *c, float *x /* (sum T, hidden), in place */) {
    if (n < 1) return -1;
    const pl_model *m = segs[0].m;
    const int H = m->n_heads, KV = m->n_kv, hd = m->head_dim, D = m->hidden;
    if (hd > 512 || KV < 1 || H % KV || !fused_layers_ok(m)) return -1;
    long rows = 0;
    for (int s = 0; s < n; s++) {  /* every segment: the same weights and shapes, its own valid cache span */
        const pl_model *ms = segs[s].m;
        if (ms->layers != m->layers || ms->n_layers != m->n_layers || ms->hidden != D || ms->n_heads != H ||
            ms->n_kv != KV || ms->head_dim != hd || ms->inter != m->inter || ms->rotary_dim != m->rotary_dim ||
            !kv_type_ok(ms->kv_type, hd) ||
            segs[s].T < 1 || segs[s].start < 0 || segs[s].start + segs[s].T > ms->capacity || segs[s].window < 0 ||
            segs[s].cos == NULL || segs[s].sin == NULL)
            return -1;
        rows += segs[s].T;
    }
    if (rows > INT_MAX / 2) return -1;
    const int T = (int)rows;
    int *off = malloc(sizeof(int) * (size_t)(2 * n + 2));
    fa_job *fjs = calloc((size_t)n, sizeof(fa_job));
    if (off == NULL || fjs == NULL) { free(off); free(fjs); return -2; }
    const int ldq = pad16((H + 2 * KV) * hd), ldg = pad16(2 * m->inter), ldy = pad16(D);
    int *joff = off + n + 1;
    off[0] = joff[0] = 0;
    for (int s = 0; s < n; s++) {  /* row offsets, and each segment's attention job (its layer set per layer) */
        fa_job *f = &fjs[s];
        f->m = segs[s].m; f->T = segs[s].T; f->start = segs[s].start; f->window = segs[s].window; f->ldq = ldq;
        fa_plan(segs[s].T, &f->nq, &f->groups);
        f->qkv = c->qkv + (size_t)off[s] * ldq; f->att = c->att + (size_t)off[s] * H * hd;
        off[s + 1] = off[s] + segs[s].T;
        joff[s + 1] = joff[s] + H * f->groups;
    }
    int rc = 0;
    for (int l = 0; l < m->n_layers && rc == 0; l++) {
        const pl_layer *L = &m->layers[l];
        prefill_job r = {m, l, ldq, ldg, ldy, PF_NORM, L->attn_norm, x, c->xn, c->qkv, c->gu, c->hmid, c->y};
        double t0 = now_s(), t1;
#define LAP(i) (t1 = now_s(), g_prefill_s[i] += t1 - t0, t0 = t1)
        parallel_rows(prefill_row, &r, T);
        LAP(2);
        rows_matmul(&L->qkv, c->xn, T, c->qkv, c->qa, c->da, c->sa_i, c->sa_f);
        LAP(0);
        seg_rope_job sr = {segs, off, n, l, ldq, c->qkv};
        parallel_rows(seg_rope_store, &sr, T);
        LAP(2);
        for (int s = 0; s < n; s++) { fjs[s].layer = l; atomic_store(&fjs[s].failed, 0); }
        seg_fa_job sf = {fjs, joff, n};
        parallel_run(seg_flash, &sf, joff[n]);
        for (int s = 0; s < n; s++) if (atomic_load(&fjs[s].failed)) rc = -2;
        if (rc) break;
        LAP(1);
        rows_matmul(&L->o, c->att, T, c->y, c->qa, c->da, c->sa_i, c->sa_f);
        LAP(0);
        r.op = PF_RESIDUAL_NORM; r.w = L->ffn_norm;
        parallel_rows(prefill_row, &r, T);
        LAP(2);
        rows_matmul(&L->gate_up, c->xn, T, c->gu, c->qa, c->da, c->sa_i, c->sa_f);
        LAP(0);
        r.op = PF_SILU;
        parallel_rows(prefill_row, &r, T);
        LAP(2);
        rows_matmul(&L->down, c->hmid, T, c->y, c->qa, c->da, c->sa_i, c->sa_f);
        LAP(0);
        r.op = PF_RESIDUAL;
        parallel_rows(prefill_row, &r, T);
        LAP(2);
#undef LAP
    }
    free(off);
    free(fjs);
    return rc;
}

/* one chunk of one sequence: the cache is m's; T, start, window and the rotary rows are c's */
int pl_prefill(const pl_model *m, const pl_chunk *c, float *x /* (T, hidden), updated in place */) {
    const pl_seg seg = {m, c->T, c->start, c->window, c->cos, c->sin};
    return pl_prefill_segs(&seg, 1, c, x);
}
