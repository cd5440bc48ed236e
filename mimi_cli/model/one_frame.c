/* Products of a few rows with a large float32 weight, for one-frame CPU calls of mimi-cli.
 *
 * Compiled on first use by mimi_cli/model/native.py with the machine's C compiler (-O3, tuned
 * for this CPU). A streamed 80 ms frame puts two rows through weights of up to 32 MiB, so each call
 * is bound by reading the weight from memory: the weight is stored in blocks of BLOCK outputs
 * ([out / BLOCK][in][BLOCK], see `native.pack`), read once from start to end with the next
 * pages prefetched, while up to four rows accumulate in registers.
 */
#include <math.h>
#include <stddef.h>

#define BLOCK 32    /* outputs per block: 2 AVX-512 or 4 AVX2 registers per row */
#define AHEAD 2048  /* floats (8 KiB) of weight requested ahead of the one being read */
#define CHUNK 64    /* steps summed apart before being added to the total */

/* acc[r][j] = sum over i of x[r][i] * w[i][j], for one block w [in][BLOCK] and R rows; the sum
 * runs in pieces of CHUNK steps added together, which rounds about as a BLAS does (one running sum
 * over 2048 steps gathers ~2.5 times its error). */
#define BLOCK_TIMES_ROWS(R)                                                                      \
    static void block_times_##R(const float *restrict w, int in, const float *const *x,         \
                                float acc[][BLOCK]) {                                           \
        float total[R][BLOCK], a[R][BLOCK];                                                     \
        for (int r = 0; r < R; r++)                                                             \
            for (int j = 0; j < BLOCK; j++) total[r][j] = 0.0f;                                 \
        for (int start = 0; start < in; start += CHUNK) {                                       \
            const int end = in - start < CHUNK ? in : start + CHUNK;                            \
            for (int r = 0; r < R; r++)                                                         \
                for (int j = 0; j < BLOCK; j++) a[r][j] = 0.0f;                                 \
            for (int i = start; i < end; i++) {                                                 \
                const float *wi = w + (size_t)i * BLOCK;                                        \
                __builtin_prefetch(wi + AHEAD, 0, 0);                                           \
                __builtin_prefetch(wi + AHEAD + 16, 0, 0);                                      \
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

BLOCK_TIMES_ROWS(1)
BLOCK_TIMES_ROWS(2)
BLOCK_TIMES_ROWS(3)
BLOCK_TIMES_ROWS(4)

int mimi_block_size(void) { return BLOCK; }

/* y [rows][out] = x @ weightᵀ (+ bias), x row r at x + r * x_stride, weight in blocks [ceil(out / BLOCK)][in][BLOCK]
 * (the last block zero-padded); bias may be NULL. */
void mimi_rows_times_blocks(const float *blocks, int in, int out, const float *x, long x_stride, int rows,
                            const float *bias, float *y) {
    float acc[4][BLOCK];
    const int num_blocks = (out + BLOCK - 1) / BLOCK;
    for (int b = 0; b < num_blocks; b++) {
        const float *w = blocks + (size_t)b * in * BLOCK;
        const int first = b * BLOCK, count = out - first < BLOCK ? out - first : BLOCK;
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int group = rows - r0 < 4 ? rows - r0 : 4;
            const float *xs[4];
            for (int r = 0; r < group; r++) xs[r] = x + (size_t)(r0 + r) * x_stride;
            switch (group) {
                case 1: block_times_1(w, in, xs, acc); break;
                case 2: block_times_2(w, in, xs, acc); break;
                case 3: block_times_3(w, in, xs, acc); break;
                default: block_times_4(w, in, xs, acc); break;
            }
            for (int r = 0; r < group; r++) {
                float *yr = y + (size_t)(r0 + r) * out + first;
                for (int j = 0; j < count; j++) yr[j] = bias ? acc[r][j] + bias[first + j] : acc[r][j];
            }
        }
    }
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
            float top = -__builtin_inff();
            for (int t = first; t <= last; t++) {
                const float *kt = kh + (size_t)t * dim;
                float part[16] = {0};
                int d = 0;
                for (; d + 16 <= dim; d += 16)
                    for (int j = 0; j < 16; j++) part[j] += qs[d + j] * kt[d + j];
                for (; d < dim; d++) part[0] += qs[d] * kt[d];
                float dot = 0.0f;
                for (int j = 0; j < 16; j++) dot += part[j];
                scores[t] = dot * scale;
                if (scores[t] > top) top = scores[t];
            }
            float total = 0.0f;
            for (int t = first; t <= last; t++) {
                scores[t] = expf(scores[t] - top);
                total += scores[t];
            }
            float *os = out + ((size_t)s * heads + h) * dim;
            for (int d = 0; d < dim; d++) os[d] = 0.0f;
            for (int t = first; t <= last; t++) {
                const float *vt = vh + (size_t)t * dim;
                const float p = scores[t];
                for (int d = 0; d < dim; d++) os[d] += p * vt[d];
            }
            const float inverse = 1.0f / total;
            for (int d = 0; d < dim; d++) os[d] *= inverse;
        }
    }
}
