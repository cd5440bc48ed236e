/* Products of a few rows with a large float32 weight, for one-frame CPU calls of mimi-cli.
 *
 * Compiled on first use by mimi_cli/model/native.py with the machine's C compiler (-O3, tuned
 * for this CPU). A streamed 80 ms frame puts two rows through weights of up to 32 MiB, so each call
 * is bound by reading the weight from memory: the weight is stored in blocks of BLOCK outputs
 * ([out / BLOCK][in][BLOCK], see `native.pack`), read once from start to end with the weight
 * ahead prefetched, while up to four rows accumulate in registers.
 *
 * How far ahead, and into which cache, is set per machine (`mimi_set_prefetch`, chosen by timing in
 * `routes.py`): an AMD EPYC read 33 GB/s with non-temporal prefetches 8 KiB ahead, where an Intel Xeon
 * read 5.5 GB/s with the same ones and 12–13 GB/s with prefetches into L2 2–4 KiB ahead.
 *
 * One core may not saturate memory (the same Xeon: 16 GB/s on one thread, 33 on two), so a product's
 * blocks may be shared with helper threads (`mimi_set_threads`, also chosen by timing). Each thread
 * claims blocks from one counter, so the calling thread never waits for a helper that is not running:
 * it does every block itself if need be, and waits only for blocks a helper has claimed. Helpers spin
 * a while between products (a frame's products come a few hundred µs apart), then sleep.
 *
 * Sharing pays only where cores are free: on a busy machine a helper stopped mid-claim holds up the
 * product, and a spinning helper pushes other work onto the caller's core (an Intel Xeon with one
 * core busy elsewhere: a frame 22 ms alone, 29 shared). So the caller can turn sharing off and on
 * (`mimi_set_sharing`): each stream times its frames both ways as it goes (`routes.Sharing`).
 *
 * Also here: the SEANet's ELU in one vectorized pass (`mimi_elu`; torch's costs ~1.4 ns a value on an
 * AMD EPYC with AVX-512, this one ~0.55, and ~0.8 with AVX2 only), taken where `routes.py` times it faster.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define BLOCK 32 /* outputs per block: 2 AVX-512 or 4 AVX2 registers per row */
#define CHUNK 64 /* steps summed apart before being added to the total */

static long ahead = 2048; /* floats of weight requested ahead of the one being read */
static int locality = 0;  /* __builtin_prefetch's: 0 non-temporal, 2 into L2 (T1), 3 into L1 (T0) */

/* Sets the prefetch distance (floats) and locality (0, 2 or 3) of the products; 0 on success. */
int mimi_set_prefetch(long floats_ahead, int cache_locality) {
    if (floats_ahead < 0 || (cache_locality != 0 && cache_locality != 2 && cache_locality != 3)) return 1;
    ahead = floats_ahead, locality = cache_locality;
    return 0;
}

/* acc[r][j] = sum over i of x[r][i] * w[i][j], for one block w [in][BLOCK] and R rows, with
 * prefetches of locality L; the sum runs in pieces of CHUNK steps added together, which rounds about
 * as a BLAS does (one running sum over 2048 steps gathers ~2.5 times its error). */
#define BLOCK_TIMES_ROWS(R, L)                                                                   \
    static void block_times_##R##_##L(const float *restrict w, int in, const float *const *x,   \
                                      float acc[][BLOCK]) {                                     \
        float total[R][BLOCK], a[R][BLOCK];                                                     \
        for (int r = 0; r < R; r++)                                                             \
            for (int j = 0; j < BLOCK; j++) total[r][j] = 0.0f;                                 \
        for (int start = 0; start < in; start += CHUNK) {                                       \
            const int end = in - start < CHUNK ? in : start + CHUNK;                            \
            for (int r = 0; r < R; r++)                                                         \
                for (int j = 0; j < BLOCK; j++) a[r][j] = 0.0f;                                 \
            for (int i = start; i < end; i++) {                                                 \
                const float *wi = w + (size_t)i * BLOCK;                                        \
                __builtin_prefetch(wi + ahead, 0, L);                                           \
                __builtin_prefetch(wi + ahead + 16, 0, L);                                      \
                for (int r = 0; r < R; r++) {                                                   \
                    const float s = x[r][i];                                                    \
                    for (int j = 0; j < BLOCK; j++) a[r][j] += s * wi[j];                       \
                }                                                                               \
            }                                                                                   \
            for (int r = 0; r < R; r++)                                                         \
                for (int j = 0; j < BLOCK; j++) total[r][j] += a[r][j];                         \
        }                                                                                       \
        for (int r = 0; r < R; r++)                                                             \
            for (int j = 0; j < BLOCK; j++) acc[r][j] = total[r][j];                            \
    }

#define BLOCK_TIMES_ROWS_UP_TO_4(L) \
    BLOCK_TIMES_ROWS(1, L)          \
    BLOCK_TIMES_ROWS(2, L)          \
    BLOCK_TIMES_ROWS(3, L)          \
    BLOCK_TIMES_ROWS(4, L)          \
    static void block_times_rows_##L(const float *w, int in, const float *const *x, int rows,   \
                                     float acc[][BLOCK]) {                                      \
        switch (rows) {                                                                         \
            case 1: block_times_1_##L(w, in, x, acc); break;                                    \
            case 2: block_times_2_##L(w, in, x, acc); break;                                    \
            case 3: block_times_3_##L(w, in, x, acc); break;                                    \
            default: block_times_4_##L(w, in, x, acc); break;                                   \
        }                                                                                       \
    }

BLOCK_TIMES_ROWS_UP_TO_4(0)
BLOCK_TIMES_ROWS_UP_TO_4(2)
BLOCK_TIMES_ROWS_UP_TO_4(3)

int mimi_block_size(void) { return BLOCK; }

/* One product of `mimi_rows_times_blocks`, as the threads that share it see it. */
struct product {
    const float *blocks, *x, *bias, *gain, *residual;
    float *y;
    long x_stride;
    int in, out, rows, num_blocks;
};

/* Blocks [first, last) of a product. */
static void product_blocks(const struct product *p, int first_block, int last_block) {
    float acc[4][BLOCK];
    for (int b = first_block; b < last_block; b++) {
        const float *w = p->blocks + (size_t)b * p->in * BLOCK;
        const int first = b * BLOCK, count = p->out - first < BLOCK ? p->out - first : BLOCK;
        for (int r0 = 0; r0 < p->rows; r0 += 4) {
            const int group = p->rows - r0 < 4 ? p->rows - r0 : 4;
            const float *xs[4];
            for (int r = 0; r < group; r++) xs[r] = p->x + (size_t)(r0 + r) * p->x_stride;
            switch (locality) {
                case 0: block_times_rows_0(w, p->in, xs, group, acc); break;
                case 2: block_times_rows_2(w, p->in, xs, group, acc); break;
                default: block_times_rows_3(w, p->in, xs, group, acc); break;
            }
            for (int r = 0; r < group; r++) {
                const size_t row = (size_t)(r0 + r) * p->out + first;
                for (int j = 0; j < count; j++) {
                    float value = p->bias ? acc[r][j] + p->bias[first + j] : acc[r][j];
                    if (p->gain) value *= p->gain[first + j];
                    p->y[row + j] = p->residual ? p->residual[row + j] + value : value;
                }
            }
        }
    }
}

/* ---- threads sharing a product's blocks ---------------------------------------------------------- */

#define MAX_THREADS 16
#define CLAIM 2 /* blocks claimed at a time: 128 KiB of a [*, 512] weight */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    /* the job: its generation in the high 32 bits, the next unclaimed block in the low 32 */
    _Atomic uint64_t ticket;
    atomic_int done;     /* blocks of the job finished */
    atomic_int sleepers; /* helpers asleep on `wake` */
    atomic_int busy;     /* a caller is using the pool (a second caller computes alone) */
    /* job g lies in jobs[g % 2]: the slot written for job g + 1 is not the one a late helper of job g
     * reads, and a claim on job g (ticket's generation g) proves that g's slot is still whole */
    struct product jobs[2];
    int started, wanted; /* helpers running, helpers wanted (threads - 1) */
    long spin_ns;        /* how long a helper spins for the next job before it sleeps */
    int sharing;         /* 0: the caller computes alone while the helpers sleep */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, {{0}}, 0, 0, 200000, 1};

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Claims and computes blocks of job `generation` until none is left (or the job is another's). */
static void share(uint32_t generation) {
    for (;;) {
        uint64_t ticket = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        if ((uint32_t)(ticket >> 32) != generation) return;
        /* read before the claim: a claim that succeeds proves the slot was not rewritten meanwhile */
        const struct product job = pool.jobs[generation % 2];
        const int first = (int)(uint32_t)ticket;
        if (first >= job.num_blocks) return;
        const int last = first + CLAIM < job.num_blocks ? first + CLAIM : job.num_blocks;
        if (!atomic_compare_exchange_weak(&pool.ticket, &ticket, ticket + (uint64_t)(last - first))) continue;
        product_blocks(&job, first, last);
        atomic_fetch_add_explicit(&pool.done, last - first, memory_order_release);
    }
}

static void *helper(void *index) {
    const int me = (int)(intptr_t)index;
    uint32_t seen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
    for (;;) {
        long spun_since = now_ns();
        for (int spins = 0; (uint32_t)(atomic_load(&pool.ticket) >> 32) == seen; spins++) {
            relax();
            if ((spins & 63) == 0 && now_ns() - spun_since > pool.spin_ns) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((uint32_t)(atomic_load(&pool.ticket) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
                spun_since = now_ns();
            }
        }
        seen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
        if (me < pool.wanted) share(seen); /* helpers beyond the wanted count stay idle */
    }
    return 0;
}


/* In a child made by fork, where the helpers do not exist: the caller computes alone. */
static void forget_helpers(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.busy, 0);
    pool.started = pool.wanted = 0;
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_helpers); }

/* Threads that share a product's blocks (1: the caller alone; at most MAX_THREADS) and how long
 * (µs) a helper spins for the next product before it sleeps; 0 on success. */
int mimi_set_threads(int threads, long spin_us) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (threads < 1 || threads > MAX_THREADS || spin_us < 0) return 1;
    pthread_once(&once, register_fork_handler);
    pthread_mutex_lock(&pool.lock);
    pool.spin_ns = spin_us * 1000;
    while (pool.started < threads - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, helper, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    pool.wanted = threads - 1 < pool.started ? threads - 1 : pool.started;
    pthread_mutex_unlock(&pool.lock);
    return pool.wanted == threads - 1 ? 0 : 2;
}

/* Whether products are shared with the helpers (1, as at first) or computed by the caller alone (0). */
void mimi_set_sharing(int on) { pool.sharing = on != 0; }

/* y [rows][out] = residual + gain ⊙ (x @ weightᵀ + bias), x row r at x + r * x_stride, weight in blocks
 * [ceil(out / BLOCK)][in][BLOCK] (the last block zero-padded); bias, gain and residual ([rows][out]) may
 * each be NULL (none, ones, zeros). y may be the residual itself. */
void mimi_rows_times_blocks(const float *blocks, int in, int out, const float *x, long x_stride, int rows,
                            const float *bias, const float *gain, const float *residual, float *y) {
    const int num_blocks = (out + BLOCK - 1) / BLOCK;
    const struct product job = {blocks, x, bias, gain, residual, y, x_stride, in, out, rows, num_blocks};
    if (pool.wanted == 0 || !pool.sharing || num_blocks < 2 * CLAIM || atomic_exchange(&pool.busy, 1)) {
        product_blocks(&job, 0, num_blocks);
        return;
    }
    const uint32_t generation = (uint32_t)(atomic_load(&pool.ticket) >> 32) + 1;
    pool.jobs[generation % 2] = job;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.ticket, (uint64_t)generation << 32); /* publishes the job */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    share(generation);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < num_blocks) relax();
    atomic_store(&pool.busy, 0);
}

/* Sum of a[d] * b[d]: in 16 lanes, then halved four times (no chain of dim dependent adds). */
static inline float dot(const float *restrict a, const float *restrict b, int dim) {
    float part[16] = {0}, tail = 0.0f;
    int d = 0;
    for (; d + 16 <= dim; d += 16)
        for (int j = 0; j < 16; j++) part[j] += a[d + j] * b[d + j];
    for (; d < dim; d++) tail += a[d] * b[d];
    for (int width = 8; width >= 1; width /= 2)
        for (int j = 0; j < width; j++) part[j] += part[j + width];
    return part[0] + tail;
}

/* x = n·ln2 + r with |r| <= ln2 / 2 (-87 <= x <= 0): returns n, sets r. ln 2 is taken in two parts
 * (0.693359375 is exact in a few bits, so n times it is exact too), so r keeps float precision. */
static inline float ln2_multiple(float x, float *r) {
    const float magic = 12582912.0f; /* 1.5 · 2^23: adding it rounds to an integer */
    const float n = (x * 1.44269504088896341f + magic) - magic;
    *r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln 2 = 0.693359375 - 2.12194440e-4 */
    return n;
}

/* 2^n for an integer n from -126 to 0, put in the exponent bits. */
static inline float power_of_two(float n) {
    const int bits = ((int)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return scale;
}

/* exp(x) for x <= 0, within ~2 ulp, in plain arithmetic so that a loop of it vectorizes (libm's expf
 * is one call per value): x = n·ln2 + r, exp(r) by its Taylor series to r^7, times 2^n. Below -87
 * (where exp(x) < 2^-125) it returns ~1.6e-38, not 0. */
static inline float exp_nonpositive(float x) {
    float r;
    const float n = ln2_multiple(x < -87.0f ? -87.0f : x, &r);
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * power_of_two(n);
}

/* Causal sliding-window attention of a few query steps over the keys and values kept by a stream.
 *
 * q: [heads][steps][dim] (strides q_head, q_step); k, v: [heads][keys][dim] (head stride kv_head,
 * step stride dim); query s stands at position num_past + s among the keys and sees the `window`
 * keys ending there. out: [steps][heads][dim], contiguous; scores: room for `keys` floats.
 * A head's keys and values are read once from memory (the second query finds them in cache). */
void mimi_window_attention(const float *q, long q_head, long q_step, const float *k, const float *v,
                           long kv_head, int heads, int steps, int keys, int dim, int num_past, int window,
                           float scale, float *scores, float *out) {
    for (int h = 0; h < heads; h++) {
        const float *kh = k + (size_t)h * kv_head, *vh = v + (size_t)h * kv_head;
        for (int s = 0; s < steps; s++) {
            const float *qs = q + (size_t)h * q_head + (size_t)s * q_step;
            const int last = num_past + s < keys - 1 ? num_past + s : keys - 1;
            const int first = last - window + 1 > 0 ? last - window + 1 : 0;
            const int count = last - first + 1;
            float *p = scores + first;
            float top = -__builtin_inff();
            for (int t = 0; t < count; t++) {
                p[t] = dot(qs, kh + (size_t)(first + t) * dim, dim) * scale;
                top = p[t] > top ? p[t] : top;
            }
            float part[16] = {0}, total = 0.0f;
            int t = 0;
            for (; t + 16 <= count; t += 16)
                for (int j = 0; j < 16; j++) {
                    p[t + j] = exp_nonpositive(p[t + j] - top);
                    part[j] += p[t + j];
                }
            for (; t < count; t++) {
                p[t] = exp_nonpositive(p[t] - top);
                total += p[t];
            }
            for (int j = 0; j < 16; j++) total += part[j];
            float *os = out + ((size_t)s * heads + h) * dim;
            for (int d = 0; d < dim; d++) os[d] = 0.0f;
            for (t = 0; t < count; t++) {
                const float *vt = vh + (size_t)(first + t) * dim;
                for (int d = 0; d < dim; d++) os[d] += p[t] * vt[d];
            }
            const float inverse = 1.0f / total;
            for (int d = 0; d < dim; d++) os[d] *= inverse;
        }
    }
}

/* One streamed call of a layer's attention from its stacked projections, before the output projection.
 *
 * qkv: [steps][3][heads][dim] (q, k, v of each step); cos, sin: [steps][dim], the "rotate half" RoPE
 * tables of the steps' positions. The rotated keys and the values of the steps are written into k, v
 * ([heads][num_past + steps][dim], head stride kv_head) after the num_past kept ones, then the steps
 * attend as in `mimi_window_attention`. q_rotated: room for [heads][steps][dim]; out: [steps][heads][dim]. */
void mimi_rope_attention(const float *qkv, const float *cos, const float *sin, float *k, float *v,
                         long kv_head, int heads, int steps, int dim, int num_past, int window, float scale,
                         float *q_rotated, float *scores, float *out) {
    const int half = dim / 2, width = heads * dim;
    for (int s = 0; s < steps; s++) {
        const float *c = cos + (size_t)s * dim, *n = sin + (size_t)s * dim;
        for (int h = 0; h < heads; h++) {
            const float *qs = qkv + (size_t)s * 3 * width + (size_t)h * dim;
            const float *ks = qs + width, *vs = qs + 2 * width;
            float *qr = q_rotated + ((size_t)h * steps + s) * dim;
            float *kr = k + (size_t)h * kv_head + (size_t)(num_past + s) * dim;
            float *vr = v + (size_t)h * kv_head + (size_t)(num_past + s) * dim;
            for (int i = 0; i < half; i++) {
                qr[i] = qs[i] * c[i] - qs[i + half] * n[i];
                kr[i] = ks[i] * c[i] - ks[i + half] * n[i];
            }
            for (int i = half; i < dim; i++) {
                qr[i] = qs[i] * c[i] + qs[i - half] * n[i];
                kr[i] = ks[i] * c[i] + ks[i - half] * n[i];
            }
            for (int i = 0; i < dim; i++) vr[i] = vs[i];
        }
    }
    mimi_window_attention(q_rotated, (long)steps * dim, dim, k, v, kv_head, heads, steps, num_past + steps, dim,
                          num_past, window, scale, scores, out);
}

/* Residual vector quantization of one row against `count` codebooks in turn.
 *
 * residual [dim] is replaced by what remains; for codebook c, tables[c] is its distance table
 * [size][e, 1, |e|²] in blocks (as for `mimi_rows_times_blocks`, with in = dim + 2) and centroids[c]
 * its centroids, row r at centroids[c] + r * centroid_stride. The distances are those of
 * `Codebook.nearest`: sqrt(max(0, [-2x, |x|², 1] · [e, 1, |e|²])), the first smallest wins.
 * scratch: room for dim + 2 + size floats. codes: count int64. */
void mimi_residual_codes(float *residual, int dim, int count, const float *const *tables,
                         const float *const *centroids, long centroid_stride, int size, float *scratch,
                         long long *codes) {
    float *padded = scratch, *distances = scratch + dim + 2;
    for (int c = 0; c < count; c++) {
        int i;
        for (i = 0; i < dim; i++) padded[i] = residual[i] * -2.0f;
        padded[dim] = dot(residual, residual, dim);
        padded[dim + 1] = 1.0f;
        mimi_rows_times_blocks(tables[c], dim + 2, size, padded, 0, 1, 0, 0, 0, distances);
        int best = 0;
        float nearest = sqrtf(distances[0] > 0.0f ? distances[0] : 0.0f);
        for (int r = 1; r < size; r++) {
            const float distance = sqrtf(distances[r] > 0.0f ? distances[r] : 0.0f);
            if (distance < nearest) nearest = distance, best = r;
        }
        codes[c] = best;
        const float *centroid = centroids[c] + (size_t)best * centroid_stride;
        for (i = 0; i < dim; i++) residual[i] -= centroid[i];
    }
}

/* expm1(x) for -87 <= x <= 0, within ~1 ulp, in plain arithmetic so that a loop of it vectorizes:
 * x = n·ln2 + r with |r| <= ln2 / 2, expm1(r) = r + r²·P(r) by its Taylor series to r^8 (relative
 * error below 0.02 ulp; written so that it keeps its relative accuracy near 0), then expm1(x) =
 * 2^n·expm1(r) + (2^n - 1): the product is exact (a power of two) and so is 2^n - 1 (n >= -24;
 * below, it rounds to -1, as the result does), so the last sum is the only rounding after the series. */
static inline float expm1_nonpositive(float x) {
    float r;
    const float n = ln2_multiple(x, &r);
    float p = 1.0f / 40320.0f;
    p = p * r + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    const float m = r + (r * r) * p; /* expm1(r) */
    const float scale = power_of_two(n);
    return scale * m + (scale - 1.0f);
}

/* y = ELU(x) (alpha 1: x where x > 0, else expm1(x); NaN stays NaN) of n values; y may be x.
 * Every choice is made on the bits, as integers: GCC vectorizes a float comparison that feeds a
 * choice only with AVX-512's masks (or where floating-point exceptions may be ignored). */
void mimi_elu(const float *x, float *y, long n) {
    const int32_t minus_87 = (int32_t)0xC2AE0000, magnitude_87 = 0x42AE0000, infinity = 0x7F800000;
    for (long i = 0; i < n; i++) {
        int32_t bits, e_bits;
        __builtin_memcpy(&bits, x + i, sizeof bits);
        const int32_t magnitude = bits & 0x7FFFFFFF;
        const int32_t keep = ~(bits >> 31) | -(int32_t)(magnitude > infinity); /* x > 0, +0 or NaN */
        const int32_t below_bits = (magnitude > magnitude_87 ? minus_87 : bits) & ~keep; /* in [-87, 0] */
        float below, e;
        __builtin_memcpy(&below, &below_bits, sizeof below);
        e = expm1_nonpositive(below);
        __builtin_memcpy(&e_bits, &e, sizeof e_bits);
        const int32_t out = (bits & keep) | (e_bits & ~keep);
        __builtin_memcpy(y + i, &out, sizeof out);
    }
}
