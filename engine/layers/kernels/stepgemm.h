/* The recurrent step's GEMM (stepgemm.c), for the Python bindings in native.c. */
#ifndef STEPGEMM_H
#define STEPGEMM_H
#include <stddef.h>
#include <stdint.h>

#define SG_MR 32            /* rows per packed panel */
#define SG_MAXT 64          /* most threads */

enum { SG_ISA_NONE = 0, SG_ISA_AVX2 = 2, SG_ISA_AVX512 = 3 };

/* the best instruction set this CPU gives the kernels (SG_ISA_NONE: no kernel) */
int sg_cpu_isa(void);
/* floats of a packed (M, K) operand */
size_t sg_packed_size(ptrdiff_t M, ptrdiff_t K);
/* pack A[i][k] = a[i*rs + k*cs], i < M, k < K, as columns koff..koff+K-1 of a packed
 * (M, ktot) operand (sg_packed_size(M, ktot) floats at dst): the whole of it with koff = 0
 * and ktot = K, or [a1 a2] from two matrices, one call each */
void sg_pack_at(float *dst, const float *a, ptrdiff_t rs, ptrdiff_t cs, ptrdiff_t M,
                ptrdiff_t K, ptrdiff_t ktot, ptrdiff_t koff, int nthreads);
/* A one-hot input's projection, done by the step GEMM: table (V, R) is the transposed
 * table W_x + b (gather) or the transposed gradient of W_x (scatter), row u at
 * table + u*trs; idx (N,) the step's tokens, each in [0, V). */
typedef struct {
    float *table;
    ptrdiff_t trs;
    const int32_t *idx;
    int scatter;
} sg_onehot;

/* What a step GEMM does besides the product (each optional: NULL for none): oh, a one-hot
 * projection (sg_onehot); keep, B copied there too, B[k][j] to keep[k*krs + j], from the
 * rows being packed; addend, a matrix D added to the product, C = D + A B, D[i][j] =
 * addend[i*ars + j] (ignored when accumulating: C is then D); more, B's last kmore rows
 * from a block of their own, B[kb + i][j] = more[i*mrs + j] with kb = K - kmore (a
 * product of two stacked operands, [A1 A2] [b; more]): keep, keep2 and the scatter ride
 * along with the first kb rows only (they are b's, of shape (kb, N)). */
typedef struct {
    const sg_onehot *oh;
    float *keep;
    ptrdiff_t krs;
    const float *side;  /* a block of B's shape in cache beside it, rows sdrs apart: what
                         * the scatter reads instead of B, and keep2 copies */
    ptrdiff_t sdrs;
    float *keep2;
    ptrdiff_t k2rs;
    const float *addend;
    ptrdiff_t ars;
    const float *more;
    ptrdiff_t mrs, kmore;
} sg_extras;

/* C[i][j] (+)= sum_k A[i][k] B[k][j]: A packed (M, K); B[k][j] = b[k*brs + j];
 * C[i][j] = c[i*crs + j]; j < N. x (NULL: none), see sg_extras: a gather adds
 * table[idx[j]][i] to C[i][j] after the sum, in its registers (R = M); a scatter adds B's
 * columns into the tokens' rows, table[idx[j]][k] += B[k][j] (R = K), from B's rows while
 * they are packed. isa: SG_ISA_AVX2 or SG_ISA_AVX512 (at most sg_cpu_isa()). nthreads:
 * threads to split the rows over (the caller's included). Returns 0, or -1 when out of
 * memory (nothing written). */
int sg_gemm(const float *pa, ptrdiff_t M, ptrdiff_t K, const float *b, ptrdiff_t brs,
            ptrdiff_t N, float *c, ptrdiff_t crs, int accumulate, const sg_extras *x, int isa,
            int nthreads);
/* acc[idx[j]*ars + r] += d[r*drs + j], r < R, j < n (the scatter of sg_onehot alone), the
 * rows split over nthreads; isa as for sg_gemm, or SG_ISA_NONE for plain C */
void sg_scatter_t(float *acc, ptrdiff_t ars, const float *d, ptrdiff_t drs, ptrdiff_t R,
                  const int32_t *idx, ptrdiff_t n, int isa, int nthreads);
/* a unit of a task: fn(arg, u, t, next) runs unit u on thread t (0: the caller's; t < the
 * n of sg_run); next is the unit thread t will likely run after it (-1: none known) */
typedef void (*sg_unit_fn)(void *arg, ptrdiff_t u, int t, ptrdiff_t next);
/* fn for each of units units, once each, on up to n of the pool's threads (the caller's
 * included), each thread starting with its own run of them and then taking the others'
 * that are left; fewer threads (down to the caller alone) when the pool is busy or a thread
 * cannot be made. Returns when every unit is done. */
void sg_run(sg_unit_fn fn, void *arg, ptrdiff_t units, int n);
/* fn(arg, t, n) for each share t = 0..n-1 of a partition, each once, on whichever of the
 * pool's threads takes it (sg_run with n units) */
void sg_parallel(void (*fn)(void *arg, int t, int n), void *arg, int n);
/* the pool's threads go to sleep at once instead of spinning for the next task (the caller
 * knows none comes soon, and another pool, the BLAS's, is about to work) */
void sg_park(void);
/* how many times a caller moved a worker off its own core (see "the pool") */
long sg_moves(void);
/* ns per round trip of a cache line between the caller pinned to cpu_a and a thread on
 * cpu_b, over ``rounds`` round trips; -1 where either core cannot be had (for benchmarks) */
double sg_round_trip_ns(int cpu_a, int cpu_b, int rounds);
/* called before the pool's threads start work: puts another pool (the BLAS's) to sleep */
void sg_set_quiet(void (*fn)(void));

#endif
