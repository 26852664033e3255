/* The recurrent step's GEMM: C = A B with A a weight matrix packed once per batch and B a
 * step's (K, N) block with N the batch (50 columns in char-rnn), on threads of our own.
 *
 * Why not the BLAS NumPy links: a step GEMM is skinny (LSTM 512: 2048 x 512 times
 * 512 x 50), and OpenBLAS repacks all of A (4 MB) at every call, fifty times per batch,
 * to do 105 MFLOP with it. Here A is packed once per batch (per call of the step loop),
 * into panels of SG_MR = 32 rows, each panel k-major (for each k its 32 values
 * contiguous), so a micro-kernel reads it as vectors; B is packed per call (K x N, 100
 * KB) into column panels, k-major, from which the kernel broadcasts. The kernels keep a
 * 32 x nr tile of C in registers (AVX-512: 2 vectors per column, nr <= 14; AVX2: the
 * panel in two halves of 16 rows, nr <= 6), then transpose it in registers (16 x 16 or
 * 8 x 8) and write it to C's rows (AVX-512: masked stores; AVX2: plain stores of 4, 2 and 1
 * floats, see store_part). N is split into panels of nearly equal width so that 50 columns
 * cost no padding (13+13+12+12, or 9 x 5-6).
 *
 * Threads: the row panels of C are units of a pool of our own threads (the caller is one
 * of them): each thread starts with its own run of them, then takes what is left of the
 * others' (see "the pool" below). Two pools that spin on one core are ruinous: after an
 * OpenBLAS GEMM its worker spins for a while, and ours, sharing its core, made a 50-step
 * loop 4x slower than OpenBLAS itself. So before the pool starts work it calls a hook
 * (sg_set_quiet) that puts the other pool to sleep (engine/layers/kernels/__init__.py
 * passes OpenBLAS's blas_thread_shutdown_, after which OpenBLAS makes its threads anew at
 * its next call; measured free). Our workers in turn spin only briefly (about 50 us with
 * pause, then up to about 1 ms yielding the core) and then sleep on a futex, so they leave
 * the BLAS alone; a step loop that ends parks them at once (sg_park).
 *
 * Each thread packs all of B into a block of its own and starts its tiles without waiting
 * (what rides along with B's rows, keep and scatter, is cut into slices of K's rows, one
 * per row panel, done by the thread that takes the panel).
 * With B's rows split between the threads' packing, each thread's first pass over the
 * panels read half of B from the other core's cache, line by line, and the threads waited
 * for each other: a (400 x 103) (103 x 100) product (bi-LSTM 100) ran 1.1-1.3x faster on
 * two threads than on one, and now 1.6-1.8x; LSTM 512 steps 73.1-74.7 -> 70.6-71.8 ms.
 * When C shares memory with B (or an addend with keep), all threads pack first, as before.
 *
 * K chunks (AVX2): the AVX2 tile (16 rows at a time, 6 columns) ran its k loop over the
 * whole of K, reading its row panel from L2 again for each column panel; it now sums
 * SG_KC_AVX2 values of k at a time over all column panels, keeping the sums of the panel's
 * tiles in a buffer between chunks, so that the chunk of A (16 KB at 128) and of B stay in
 * a 32 KB L1. LSTM 512, 50 steps, AVX2 on an AVX-512 CPU: forward 32.0 -> 28.4 ms, backward
 * (K = 2048) 34.1 -> 29.8 ms. The AVX-512 tile gained nothing from it and sums all of K.
 * A sum stored and loaded back between chunks is the same float, so chunks change no bit.
 *
 * The order of the sum over k is fixed (k ascending, one accumulator per element), so a
 * result does not depend on the number of threads or the split of N.
 */
#define _GNU_SOURCE
#include "stepgemm.h"

#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SG_X86 1
#endif
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SG_FUTEX 1
#endif

/* ---------------------------------------------------------------- the CPU */

int sg_cpu_isa(void)
{
#ifdef SG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
        return SG_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return SG_ISA_AVX2;
#endif
    return SG_ISA_NONE;
}

/* -------------------------------------------------------------- the pool */

/* A task is a number of units (row panels, or a partition's shares), each run once by
 * whichever thread takes it. Thread t starts with its own run of them, [units*t/n,
 * units*(t+1)/n), taken from the front; a thread whose run is done takes the others'
 * from the back. So a worker that the host starts late (a time slice of 1-10 ms on a busy
 * machine) or that runs slower costs the caller nothing but the units it did not take:
 * the caller takes them and returns as soon as every unit is done, not when every worker
 * has been and gone. A worker that wakes after that finds its task over and does nothing.
 *
 * A thread's run is one 64-bit word, the task's generation (32 bits), the front and the
 * back (16 bits each; front > back: the thread sits this task out), changed only by
 * compare-and-swap: a worker that read the generation of a task that has ended fails its
 * claim and touches nothing of it (fn and arg are read only after a claim succeeded, and
 * the caller does not leave while a worker is busy). Which thread runs a unit changes no
 * bit of a result: a unit is computed the same wherever it runs.
 *
 * A worker on the caller's core. Linux at times queues a worker on the core the caller
 * runs on, with the other core idle, and leaves it there for milliseconds: both threads
 * are cache-hot, which its load balancer is slow to migrate. The worker then runs only
 * when the caller is preempted, and the caller does the units alone (RNN 512, 41 loops of
 * 50 steps, 2 threads: 37-613 of 2,091 tasks in six runs, each time with the worker
 * waiting, and where it was recorded on the caller's core; the slow loops ran at one
 * thread's speed, 260-320 instead of 145 us a step). So a worker
 * notes the core it waits on, and a caller that did a task alone while that core is its
 * own moves the worker off it at once (sched_setaffinity without the core, then the mask
 * as it was: the worker stays where it was moved, and keeps the user's mask). */

#define SG_MAXUNITS 0xffff

static struct {
    pthread_mutex_t lock;          /* one caller at a time; others compute alone */
    int workers;                   /* how many */
    _Atomic unsigned gen;          /* bumped per task */
    _Atomic int sleepers;          /* workers in (or entering) a futex wait */
    _Atomic int parked;            /* sg_park: sleep now, no spinning */
    _Atomic int n;                 /* threads of the current task, the caller's included */
    sg_unit_fn fn;
    void *arg;
    void (*quiet)(void);
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* each thread's run of units, whether a worker is taking units, the last task it took a
 * unit of, the core it last waited on and its thread id (a line each) */
static struct {
    _Atomic uint64_t run;
    _Atomic int busy;
    _Atomic unsigned took;
    _Atomic int cpu;
    _Atomic int tid;
} __attribute__((aligned(64))) lane[SG_MAXT];

static _Atomic long moves;         /* workers moved off the caller's core (sg_moves) */

#define RUN(gen, front, back) \
    (((uint64_t)(gen) << 32) | ((uint64_t)(front) << 16) | (uint64_t)(back))
#define RUN_GEN(w) ((unsigned)((w) >> 32))
#define RUN_FRONT(w) ((ptrdiff_t)(((w) >> 16) & 0xffff))
#define RUN_BACK(w) ((ptrdiff_t)((w) & 0xffff))

void sg_set_quiet(void (*fn)(void)) { pool.quiet = fn; }

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static inline void cpu_relax(void)
{
#ifdef SG_X86
    _mm_pause();
#endif
}

static int this_cpu(void)
{
#ifdef SG_FUTEX
    return sched_getcpu();
#else
    return -1;
#endif
}

static void wait_for_task(int id, unsigned seen)
{
    double t0 = now_us();
    for (unsigned spins = 0;; spins++) {
        if (atomic_load(&pool.gen) != seen)
            return;
        cpu_relax();
        if ((spins & 63) != 63)
            continue;
        int cpu = this_cpu();          /* its line written only when the core changed */
        if (atomic_load_explicit(&lane[id].cpu, memory_order_relaxed) != cpu)
            atomic_store_explicit(&lane[id].cpu, cpu, memory_order_relaxed);
        double dt = atomic_load(&pool.parked) ? 1e9 : now_us() - t0;
        if (dt < 50.0)
            continue;
        if (dt < 1000.0) {
            sched_yield();
            continue;
        }
#ifdef SG_FUTEX
        atomic_fetch_add(&pool.sleepers, 1);
        if (atomic_load(&pool.gen) == seen)
            syscall(SYS_futex, (unsigned *)&pool.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        atomic_fetch_sub(&pool.sleepers, 1);
#else
        sched_yield();
#endif
    }
}

/* a unit of task gen from lane v: its front one (own: v is the taker's lane) or its back
 * one; *next the unit the taker will likely run after it (-1: none known). 0: none left,
 * or the task is over. */
static int take_unit(int v, unsigned gen, int own, ptrdiff_t *u, ptrdiff_t *next)
{
    uint64_t w = atomic_load(&lane[v].run);
    for (;;) {
        ptrdiff_t f = RUN_FRONT(w), b = RUN_BACK(w);
        if (RUN_GEN(w) != gen || f >= b)
            return 0;
        uint64_t nw = own ? RUN(gen, f + 1, b) : RUN(gen, f, b - 1);
        if (atomic_compare_exchange_weak(&lane[v].run, &w, nw)) {
            *u = own ? f : b - 1;
            *next = own ? (f + 1 < b ? f + 1 : -1) : (b - 2 >= f ? b - 2 : -1);
            return 1;
        }
    }
}

/* thread t takes units of task gen, its own lane's first, then the others' (n lanes),
 * until none is left */
static void take_units(int t, int n, unsigned gen)
{
    sg_unit_fn fn = NULL;
    void *arg = NULL;
    for (int i = 0; i < n; i++) {
        int v = (t + i) % n;
        ptrdiff_t u, next;
        while (take_unit(v, gen, v == t, &u, &next)) {
            if (!fn) {                  /* read only now: the task cannot end meanwhile */
                fn = pool.fn;
                arg = pool.arg;
                atomic_store_explicit(&lane[t].took, gen, memory_order_relaxed);
            }
            fn(arg, u, t, next);
        }
    }
}

/* a worker's id (1..; the caller is thread 0) and the generation it was made at, packed
 * into its argument: reading pool.gen when the thread first runs could already see the
 * task it was made for, and it would wait for the next one */
#define WORKER_ARG(id, gen) ((void *)(((uintptr_t)(gen) << 8) | (uintptr_t)(id)))

static void *worker_main(void *p)
{
    int id = (int)((uintptr_t)p & 0xff);
    unsigned seen = (unsigned)((uintptr_t)p >> 8);
#ifdef SG_FUTEX
    atomic_store(&lane[id].tid, (int)syscall(SYS_gettid));
    pthread_setname_np(pthread_self(), "rnn-step");   /* top -H, /proc/<pid>/task/<tid>/comm */
#endif
    for (;;) {
        wait_for_task(id, seen);
        seen = atomic_load(&pool.gen);
        /* busy before the first claim: a caller that sees every lane empty after this
         * worker's claim sees it busy until its unit is done */
        atomic_store(&lane[id].busy, 1);
        uint64_t w = atomic_load(&lane[id].run);
        if (RUN_GEN(w) == seen && RUN_FRONT(w) <= RUN_BACK(w))
            take_units(id, atomic_load(&pool.n), seen);
        atomic_store(&lane[id].busy, 0);
    }
    return NULL;
}

static void after_fork_child(void)
{
    /* the workers are not in the child: it starts its own when it needs them */
    pthread_mutex_init(&pool.lock, NULL);
    pool.workers = 0;
    for (int t = 0; t < SG_MAXT; t++) {
        atomic_store(&lane[t].busy, 0);
        /* the parent's thread ids are no threads of the child's (another process may get
         * them): no move until the child's own worker has written its id */
        atomic_store(&lane[t].tid, 0);
        atomic_store(&lane[t].cpu, -1);
    }
}

static int ensure_workers(int want)
{
    static int atfork = 0;
    if (!atfork) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork = 1;
    }
    while (pool.workers < want) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&tid, &attr, worker_main,
                                WORKER_ARG(pool.workers + 1, atomic_load(&pool.gen)));
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break;
        pool.workers++;
    }
    return pool.workers;
}

/* worker t, which took no unit of the task the caller just did alone: if it waits on the
 * caller's core, move it to another of the cores its mask allows */
static void move_off(int t, int cpu)
{
#ifdef SG_FUTEX
    int tid = atomic_load(&lane[t].tid);
    if (cpu < 0 || tid <= 0 || atomic_load_explicit(&lane[t].cpu, memory_order_relaxed) != cpu)
        return;
    cpu_set_t mask, other;
    if (sched_getaffinity(tid, sizeof mask, &mask) != 0 || !CPU_ISSET(cpu, &mask)
        || CPU_COUNT(&mask) < 2)
        return;
    other = mask;
    CPU_CLR(cpu, &other);
    if (sched_setaffinity(tid, sizeof other, &other) == 0) {
        sched_setaffinity(tid, sizeof mask, &mask);
        atomic_store_explicit(&lane[t].cpu, -1, memory_order_relaxed);
        atomic_fetch_add(&moves, 1);
    }
#else
    (void)t;
    (void)cpu;
#endif
}

long sg_moves(void)
{
    return atomic_load(&moves);
}

/* ------------------------------------------------- how far apart two cores are */

/* A host can place a virtual machine's cores near each other (one L3) or far apart, and
 * move them within seconds; the step loops hand each step's h from core to core, and
 * their speed follows that distance (docs/speed.md, fifteenth session). sg_round_trip_ns
 * measures it for the benchmarks: a cache line passed back and forth between a thread on
 * core a (the caller, pinned for the while, its mask restored after) and one on core b,
 * with the pool's threads and the BLAS's (sg_set_quiet) put to sleep first. */
typedef struct {
    _Atomic int flag __attribute__((aligned(64)));
    int cpu, rounds, ok;
} rt_state;

static int pin_self(int cpu)
{
#ifdef SG_FUTEX
    if (cpu < 0 || cpu >= CPU_SETSIZE)
        return 0;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    return pthread_setaffinity_np(pthread_self(), sizeof one, &one) == 0;
#else
    (void)cpu;
    return 0;
#endif
}

static void *rt_echo(void *p)
{
    rt_state *st = p;
    st->ok = pin_self(st->cpu);
    atomic_store_explicit(&st->flag, 0, memory_order_release);   /* ready */
    if (!st->ok)
        return NULL;
    for (int i = 0; i < st->rounds; i++) {
        while (atomic_load_explicit(&st->flag, memory_order_acquire) != 1)
            ;
        atomic_store_explicit(&st->flag, 0, memory_order_release);
    }
    return NULL;
}

double sg_round_trip_ns(int cpu_a, int cpu_b, int rounds)
{
#ifdef SG_FUTEX
    cpu_set_t mask;
    if (rounds < 1 || pthread_getaffinity_np(pthread_self(), sizeof mask, &mask) != 0
        || !pin_self(cpu_a))
        return -1.0;
    sg_park();                     /* no thread of ours, nor of the BLAS's, spins meanwhile */
    if (pool.quiet)
        pool.quiet();
    rt_state st;
    atomic_init(&st.flag, 2);
    st.cpu = cpu_b;
    st.rounds = rounds;
    double ns = -1.0;
    pthread_t echo;
    if (pthread_create(&echo, NULL, rt_echo, &st) == 0) {
        while (atomic_load_explicit(&st.flag, memory_order_acquire) == 2)
            ;
        if (st.ok) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (int i = 0; i < rounds; i++) {
                atomic_store_explicit(&st.flag, 1, memory_order_release);
                while (atomic_load_explicit(&st.flag, memory_order_acquire) != 0)
                    ;
            }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / rounds;
        }
        pthread_join(echo, NULL);
    }
    pthread_setaffinity_np(pthread_self(), sizeof mask, &mask);
    return ns;
#else
    (void)cpu_a;
    (void)cpu_b;
    (void)rounds;
    return -1.0;
#endif
}

static void run_alone(sg_unit_fn fn, void *arg, ptrdiff_t units)
{
    for (ptrdiff_t u = 0; u < units; u++)
        fn(arg, u, 0, u + 1 < units ? u + 1 : -1);
}

void sg_run(sg_unit_fn fn, void *arg, ptrdiff_t units, int n)
{
    if (n > SG_MAXT)
        n = SG_MAXT;
    if (n > units)
        n = (int)units;
    if (n <= 1 || units > SG_MAXUNITS || pthread_mutex_trylock(&pool.lock) != 0) {
        run_alone(fn, arg, units);
        return;
    }
    int w = ensure_workers(n - 1);
    if (w < n - 1)
        n = w + 1;
    if (n <= 1) {
        pthread_mutex_unlock(&pool.lock);
        run_alone(fn, arg, units);
        return;
    }
    if (pool.quiet)
        pool.quiet();
    atomic_store(&pool.parked, 0);
    unsigned gen = atomic_load(&pool.gen) + 1;
    pool.fn = fn;
    pool.arg = arg;
    atomic_store(&pool.n, n);
    for (int t = 0; t <= pool.workers; t++)      /* a worker beyond n sits the task out */
        atomic_store(&lane[t].run, t < n ? RUN(gen, units * t / n, units * (t + 1) / n)
                                         : RUN(gen, 1, 0));
    atomic_store(&pool.gen, gen);
#ifdef SG_FUTEX
    if (atomic_load(&pool.sleepers))
        syscall(SYS_futex, (unsigned *)&pool.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
    take_units(0, n, gen);
    /* every unit is taken; wait for those a worker is still running */
    for (int t = 1; t < n; t++)
        while (atomic_load(&lane[t].busy))
            cpu_relax();
    for (int t = 1; t < n; t++)
        if (atomic_load_explicit(&lane[t].took, memory_order_relaxed) != gen)
            move_off(t, this_cpu());
    pthread_mutex_unlock(&pool.lock);
}

/* sg_parallel's n shares as units */
typedef struct {
    void (*fn)(void *arg, int t, int n);
    void *arg;
    int n;
} shares_args;

static void share_unit(void *p, ptrdiff_t u, int t, ptrdiff_t next)
{
    const shares_args *s = p;
    (void)t;
    (void)next;
    s->fn(s->arg, (int)u, s->n);
}

void sg_parallel(void (*fn)(void *arg, int t, int n), void *arg, int n)
{
    shares_args s = {fn, arg, n < 1 ? 1 : n};   /* sg_run caps the threads, not the shares */
    sg_run(share_unit, &s, s.n, s.n);
}

void sg_park(void)
{
    atomic_store(&pool.parked, 1);
}

static inline void share(ptrdiff_t total, int t, int n, ptrdiff_t *lo, ptrdiff_t *hi)
{
    *lo = total * t / n;
    *hi = total * (t + 1) / n;
}

/* ----------------------------------------------------------------- packing */

size_t sg_packed_size(ptrdiff_t M, ptrdiff_t K)
{
    return (size_t)((M + SG_MR - 1) / SG_MR) * SG_MR * (size_t)K;
}

typedef struct {
    float *dst;
    const float *a;
    ptrdiff_t rs, cs, M, K;
    ptrdiff_t ktot, koff;          /* columns koff.. of a packed (M, ktot) operand */
    int vector;                    /* the CPU has AVX2: pack_panel_avx2 */
} pack_args;

#ifdef SG_X86
static int pack_panel_avx2(float *d, const float *a, ptrdiff_t rs, ptrdiff_t cs, ptrdiff_t K,
                           int rows);
#endif

/* row panel pn */
static void pack_unit(void *p, ptrdiff_t pn, int t, ptrdiff_t next)
{
    const pack_args *q = p;
    (void)t;
    (void)next;
    float *d = q->dst + pn * SG_MR * q->ktot + q->koff * SG_MR;
    ptrdiff_t rows = q->M - pn * SG_MR < SG_MR ? q->M - pn * SG_MR : SG_MR;
#ifdef SG_X86
    if (q->vector && pack_panel_avx2(d, q->a + pn * SG_MR * q->rs, q->rs, q->cs, q->K,
                                     (int)rows))
        return;
#endif
    /* any other layout (or a CPU without AVX2): a float at a time */
    for (ptrdiff_t k = 0; k < q->K; k++) {
        const float *src = q->a + k * q->cs + pn * SG_MR * q->rs;
        float *dk = d + k * SG_MR;
        for (ptrdiff_t r = 0; r < SG_MR; r++)
            dk[r] = r < rows ? src[r * q->rs] : 0.0f;
    }
}

void sg_pack_at(float *dst, const float *a, ptrdiff_t rs, ptrdiff_t cs, ptrdiff_t M,
                ptrdiff_t K, ptrdiff_t ktot, ptrdiff_t koff, int nthreads)
{
    static int isa = -1;
    if (isa < 0)
        isa = sg_cpu_isa();
    pack_args q = {dst, a, rs, cs, M, K, ktot, koff, isa >= SG_ISA_AVX2};
    sg_run(pack_unit, &q, (M + SG_MR - 1) / SG_MR, nthreads);
}

/* ----------------------------------------------------------------- kernels */

/* Each kernel: the 32 x nr tile T[r][j] = sum_k pa[k*32 + r] pb[k*nr + j], plus, when add is
 * given, add[j][r] (a gathered table row per column: the one-hot input projection), written
 * to c[r*crs + j] for r < rows, added to src[r*srs + j] when src is given (c itself when
 * accumulating). */

#ifdef SG_X86
#define SG_INLINE static inline __attribute__((always_inline))

/* the AVX2 tile's K chunk (see the top of the file) */
#define SG_KC_AVX2 128

/* r[0..15] (16 columns of 16 rows) transposed in place: r[i] becomes row i */
__attribute__((target("avx512f"))) SG_INLINE void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    }
}

/* the mask of lanes i < n (n may be under 0 or over 16) */
static inline __mmask16 lanes16(int n)
{
    return (__mmask16)(n >= 16 ? 0xffffu : n <= 0 ? 0u : (1u << n) - 1u);
}

/* 16 rows of a tile, column vectors v[0..w-1], into C rows with masked stores (a store
 * element by element cost the forward step GEMM a tenth of its time) */
__attribute__((target("avx512f"))) SG_INLINE void store_rows16(const __m512 *v, int w, float *c,
                                                                ptrdiff_t crs, int rows,
                                                                const float *src, ptrdiff_t srs)
{
    __m512 r[16];
    for (int j = 0; j < 16; j++)
        r[j] = j < w ? v[j] : _mm512_setzero_ps();
    transpose16(r);
    __mmask16 m = lanes16(w);
    for (int i = 0; i < rows; i++) {
        float *crow = c + i * crs;
        __m512 x = src ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, src + i * srs), r[i]) : r[i];
        _mm512_mask_storeu_ps(crow, m, x);
    }
}

__attribute__((target("avx512f,fma"))) SG_INLINE void tile512(const float *pa, const float *pb,
                                                               ptrdiff_t K, float *c,
                                                               ptrdiff_t crs, int rows,
                                                               const float *src, ptrdiff_t srs,
                                                               int nr, const float *const *add,
                                                               const char *pf, const float *ain,
                                                               float *aout)
{
    __m512 c0[14], c1[14];
    for (int j = 0; j < nr; j++) {
        c0[j] = ain ? _mm512_load_ps(ain + j * SG_MR) : _mm512_setzero_ps();
        c1[j] = ain ? _mm512_load_ps(ain + j * SG_MR + 16) : _mm512_setzero_ps();
    }
    if (add)      /* the table rows arrive while the k loop runs */
        for (int j = 0; j < nr; j++) {
            _mm_prefetch((const char *)add[j], _MM_HINT_T0);
            _mm_prefetch((const char *)(add[j] + 16), _MM_HINT_T0);
        }
    for (ptrdiff_t k = 0; k < K; k++) {
        __m512 a0 = _mm512_loadu_ps(pa + k * SG_MR), a1 = _mm512_loadu_ps(pa + k * SG_MR + 16);
        _mm_prefetch(pf + k * 64, _MM_HINT_T1);
        const float *bk = pb + k * nr;
        for (int j = 0; j < nr; j++) {
            __m512 b = _mm512_set1_ps(bk[j]);
            c0[j] = _mm512_fmadd_ps(a0, b, c0[j]);
            c1[j] = _mm512_fmadd_ps(a1, b, c1[j]);
        }
    }
    if (aout) {   /* a K chunk before the last: the sums as they stand, for the next */
        for (int j = 0; j < nr; j++) {
            _mm512_store_ps(aout + j * SG_MR, c0[j]);
            _mm512_store_ps(aout + j * SG_MR + 16, c1[j]);
        }
        return;
    }
    if (add) {
        __mmask16 m0 = lanes16(rows), m1 = lanes16(rows - 16);
        for (int j = 0; j < nr; j++) {
            c0[j] = _mm512_add_ps(c0[j], _mm512_maskz_loadu_ps(m0, add[j]));
            c1[j] = _mm512_add_ps(c1[j], _mm512_maskz_loadu_ps(m1, add[j] + 16));
        }
    }
    store_rows16(c0, nr, c, crs, rows < 16 ? rows : 16, src, srs);
    if (rows > 16)
        store_rows16(c1, nr, c + 16 * crs, crs, rows - 16, src ? src + 16 * srs : NULL, srs);
}

#define K512(NR) \
    __attribute__((target("avx512f,fma"))) static void k512_##NR(const float *pa, \
        const float *pb, ptrdiff_t K, float *c, ptrdiff_t crs, int rows, const float *src, \
        ptrdiff_t srs, const float *const *add, const char *pf, const float *ain, float *aout) \
        { tile512(pa, pb, K, c, crs, rows, src, srs, NR, add, pf, ain, aout); }
K512(1) K512(2) K512(3) K512(4) K512(5) K512(6) K512(7)
K512(8) K512(9) K512(10) K512(11) K512(12) K512(13) K512(14)

typedef void (*tile_fn)(const float *, const float *, ptrdiff_t, float *, ptrdiff_t, int,
                        const float *, ptrdiff_t, const float *const *, const char *,
                        const float *, float *);
static const tile_fn TILES512[15] = {NULL, k512_1, k512_2, k512_3, k512_4, k512_5, k512_6,
                                     k512_7, k512_8, k512_9, k512_10, k512_11, k512_12,
                                     k512_13, k512_14};

/* r[0..7] (8 columns of 8 rows) transposed in place */
__attribute__((target("avx2"))) SG_INLINE void transpose8(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

/* lanes i < n set (a maskload's mask) */
__attribute__((target("avx2"))) SG_INLINE __m256i lanes8(int n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* the first n lanes of x (0 <= n <= 8) stored at dst, nothing after them: plain stores of
 * 8, 4, 2 and 1 floats. AVX2's masked store (vmaskmovps) is slow on AMD's Zen (3.3 against
 * 0.5 ns a store on an EPYC, Zen 4); the AVX2 tile stored each row of C through one, and
 * packing each run of B (a 50-step LSTM 512 loop, backward: 35.6 -> 30.4 ms with AVX2,
 * 30.9 -> 25.8 with AVX-512, whose packing shares these moves). */
__attribute__((target("avx2"))) SG_INLINE void store_part(float *dst, __m256 x, int n)
{
    if (n >= 8) {
        _mm256_storeu_ps(dst, x);
        return;
    }
    __m128 v = _mm256_castps256_ps128(x);
    if (n >= 4) {
        _mm_storeu_ps(dst, v);
        v = _mm256_extractf128_ps(x, 1);
        dst += 4;
        n -= 4;
    }
    if (n >= 2) {
        _mm_storel_pi((__m64 *)dst, v);
        v = _mm_movehl_ps(v, v);
        dst += 2;
        n -= 2;
    }
    if (n)
        _mm_store_ss(dst, v);
}

/* 8 rows of a tile, column vectors v[0..w-1] (w <= 6), into C rows (plain stores) */
__attribute__((target("avx2"))) SG_INLINE void store_rows8(const __m256 *v, int w, float *c,
                                                            ptrdiff_t crs, int rows,
                                                            const float *src, ptrdiff_t srs)
{
    __m256 r[8];
    for (int j = 0; j < 8; j++)
        r[j] = j < w ? v[j] : _mm256_setzero_ps();
    transpose8(r);
    __m256i m = lanes8(w);
    for (int i = 0; i < rows; i++) {
        float *crow = c + i * crs;
        __m256 x = src ? _mm256_add_ps(_mm256_maskload_ps(src + i * srs, m), r[i]) : r[i];
        store_part(crow, x, w);
    }
}

__attribute__((target("avx2,fma"))) SG_INLINE void tile256(const float *pa, const float *pb,
                                                            ptrdiff_t K, float *c, ptrdiff_t crs,
                                                            int rows, const float *src,
                                                            ptrdiff_t srs, int nr,
                                                            const float *const *add,
                                                            const char *pf, const float *ain,
                                                            float *aout)
{
    for (int half = 0; half < 2; half++) {
        const float *ph = pa + half * 16;
        __m256 c0[6], c1[6];
        for (int j = 0; j < nr; j++) {
            c0[j] = ain ? _mm256_load_ps(ain + j * SG_MR + half * 16) : _mm256_setzero_ps();
            c1[j] = ain ? _mm256_load_ps(ain + j * SG_MR + half * 16 + 8) : _mm256_setzero_ps();
        }
        if (add)
            for (int j = 0; j < nr; j++)
                _mm_prefetch((const char *)(add[j] + half * 16), _MM_HINT_T0);
        for (ptrdiff_t k = 0; k < K; k++) {
            __m256 a0 = _mm256_loadu_ps(ph + k * SG_MR), a1 = _mm256_loadu_ps(ph + k * SG_MR + 8);
            _mm_prefetch(pf + (half * K + k) * 64, _MM_HINT_T1);
            const float *bk = pb + k * nr;
            for (int j = 0; j < nr; j++) {
                __m256 b = _mm256_broadcast_ss(bk + j);
                c0[j] = _mm256_fmadd_ps(a0, b, c0[j]);
                c1[j] = _mm256_fmadd_ps(a1, b, c1[j]);
            }
        }
        if (aout) {   /* a K chunk before the last: the sums as they stand, for the next */
            for (int j = 0; j < nr; j++) {
                _mm256_store_ps(aout + j * SG_MR + half * 16, c0[j]);
                _mm256_store_ps(aout + j * SG_MR + half * 16 + 8, c1[j]);
            }
            continue;
        }
        if (add) {
            int r0 = half * 16;
            __m256i m0 = lanes8(rows - r0), m1 = lanes8(rows - r0 - 8);
            for (int j = 0; j < nr; j++) {
                c0[j] = _mm256_add_ps(c0[j], _mm256_maskload_ps(add[j] + r0, m0));
                c1[j] = _mm256_add_ps(c1[j], _mm256_maskload_ps(add[j] + r0 + 8, m1));
            }
        }
        for (int q = 0; q < 2; q++) {       /* rows half*16 + 8q .. + 7 */
            int r0 = half * 16 + 8 * q, n = rows - r0 < 8 ? rows - r0 : 8;
            if (n > 0)
                store_rows8(q ? c1 : c0, nr, c + r0 * crs, crs, n, src ? src + r0 * srs : NULL,
                            srs);
        }
    }
}

#define K256(NR) \
    __attribute__((target("avx2,fma"))) static void k256_##NR(const float *pa, \
        const float *pb, ptrdiff_t K, float *c, ptrdiff_t crs, int rows, const float *src, \
        ptrdiff_t srs, const float *const *add, const char *pf, const float *ain, float *aout) \
        { tile256(pa, pb, K, c, crs, rows, src, srs, NR, add, pf, ain, aout); }
K256(1) K256(2) K256(3) K256(4) K256(5) K256(6)
static const tile_fn TILES256[7] = {NULL, k256_1, k256_2, k256_3, k256_4, k256_5, k256_6};

/* ------------------------------------------------------------ moving floats */

/* Packing and the copies that ride along move runs of a few dozen floats. A memcpy call
 * each cost more than the move: packing a step's B (512 x 50) was 2048 calls of 52 bytes,
 * about 10 us of a 100 us RNN 512 step GEMM, and packing W_h (scalar loops, a float at a
 * time) took 1.7 ms, W_h^T 2.0 ms, per LSTM 512 batch. These use AVX2, which every CPU
 * that runs the step GEMM has; masked lanes are neither read nor written. */

/* n floats, 0 <= n <= 16 (masked loads, plain stores: see store_part) */
__attribute__((target("avx2"))) SG_INLINE void move16(float *dst, const float *src, int n)
{
    if (n > 8) {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
        dst += 8;
        src += 8;
        n -= 8;
    }
    store_part(dst, _mm256_maskload_ps(src, lanes8(n)), n);
}

/* n floats */
__attribute__((target("avx2"))) static void move_row(float *dst, const float *src, ptrdiff_t n)
{
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_loadu_ps(src + j));
    if (j < n)
        move16(dst + j, src + j, (int)(n - j));
}

/* One panel of A (its first row at a; rows < SG_MR of them, zeros after) packed k-major
 * into d, when A's rows or its columns are contiguous: 8 x 8 blocks transposed in
 * registers, or 32 floats per k moved as vectors. 0: another layout (the caller packs). */
__attribute__((target("avx2"))) static int pack_panel_avx2(float *d, const float *a,
                                                            ptrdiff_t rs, ptrdiff_t cs,
                                                            ptrdiff_t K, int rows)
{
    if (cs == 1) {
        for (int r0 = 0; r0 < SG_MR; r0 += 8)
            for (ptrdiff_t k0 = 0; k0 < K; k0 += 8) {
                int kn = K - k0 < 8 ? (int)(K - k0) : 8;
                __m256i m = lanes8(kn);
                __m256 r[8];
                for (int j = 0; j < 8; j++)
                    r[j] = r0 + j < rows ? _mm256_maskload_ps(a + (r0 + j) * rs + k0, m)
                                         : _mm256_setzero_ps();
                transpose8(r);
                for (int i = 0; i < kn; i++)
                    _mm256_storeu_ps(d + (k0 + i) * SG_MR + r0, r[i]);
            }
        return 1;
    }
    if (rs == 1) {
        __m256i m[4];
        for (int v = 0; v < 4; v++)
            m[v] = lanes8(rows - 8 * v);
        for (ptrdiff_t k = 0; k < K; k++)
            for (int v = 0; v < 4; v++)
                _mm256_storeu_ps(d + k * SG_MR + 8 * v,
                                 _mm256_maskload_ps(a + k * cs + 8 * v, m[v]));
        return 1;
    }
    return 0;
}
#endif

/* ------------------------------------------------ the one-hot input's gradient */

/* acc[idx[j]*ars + r] += d[r*drs + j] for r0 <= r < r1, j < n: a step's gradient at a
 * one-hot input's projection (R rows, n columns) added into the transposed gradient of the
 * table it was gathered from (V rows of R). Blocks of rows are transposed in registers, so
 * that each update is one vector; every element sees its j in ascending order. */
static void scatter_t_scalar(float *acc, ptrdiff_t ars, const float *d, ptrdiff_t drs,
                             const int32_t *idx, ptrdiff_t n, ptrdiff_t r0, ptrdiff_t r1)
{
    for (ptrdiff_t j = 0; j < n; j++) {     /* a row of acc at a time: its writes contiguous */
        float *a = acc + idx[j] * ars;
        for (ptrdiff_t r = r0; r < r1; r++)
            a[r] += d[r * drs + j];
    }
}

#ifdef SG_X86
__attribute__((target("avx512f"))) static void scatter_t512(float *acc, ptrdiff_t ars,
                                                            const float *d, ptrdiff_t drs,
                                                            const int32_t *idx, ptrdiff_t n,
                                                            ptrdiff_t r0, ptrdiff_t r1)
{
    ptrdiff_t r = r0;
    for (; r + 16 <= r1; r += 16)
        for (ptrdiff_t j0 = 0; j0 < n; j0 += 16) {
            int w = n - j0 < 16 ? (int)(n - j0) : 16;
            __mmask16 m = lanes16(w);
            __m512 v[16];
            for (int i = 0; i < 16; i++)
                v[i] = _mm512_maskz_loadu_ps(m, d + (r + i) * drs + j0);
            transpose16(v);            /* v[j]: column j0 + j, rows r..r+15 */
            for (int j = 0; j < w; j++) {
                float *a = acc + idx[j0 + j] * ars + r;
                _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), v[j]));
            }
        }
    scatter_t_scalar(acc, ars, d, drs, idx, n, r, r1);
}

__attribute__((target("avx2"))) static void scatter_t256(float *acc, ptrdiff_t ars,
                                                         const float *d, ptrdiff_t drs,
                                                         const int32_t *idx, ptrdiff_t n,
                                                         ptrdiff_t r0, ptrdiff_t r1)
{
    ptrdiff_t r = r0;
    for (; r + 8 <= r1; r += 8)
        for (ptrdiff_t j0 = 0; j0 < n; j0 += 8) {
            int w = n - j0 < 8 ? (int)(n - j0) : 8;
            __m256i m = lanes8(w);
            __m256 v[8];
            for (int i = 0; i < 8; i++)
                v[i] = _mm256_maskload_ps(d + (r + i) * drs + j0, m);
            transpose8(v);
            for (int j = 0; j < w; j++) {
                float *a = acc + idx[j0 + j] * ars + r;
                _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), v[j]));
            }
        }
    scatter_t_scalar(acc, ars, d, drs, idx, n, r, r1);
}
#endif

static void scatter_t(int isa, float *acc, ptrdiff_t ars, const float *d, ptrdiff_t drs,
                      const int32_t *idx, ptrdiff_t n, ptrdiff_t r0, ptrdiff_t r1)
{
#ifdef SG_X86
    if (isa == SG_ISA_AVX512) {
        scatter_t512(acc, ars, d, drs, idx, n, r0, r1);
        return;
    }
    if (isa == SG_ISA_AVX2) {
        scatter_t256(acc, ars, d, drs, idx, n, r0, r1);
        return;
    }
#endif
    (void)isa;
    scatter_t_scalar(acc, ars, d, drs, idx, n, r0, r1);
}

typedef struct {
    float *acc;
    const float *d;
    const int32_t *idx;
    ptrdiff_t ars, drs, R, n;
    int isa;
} scatter_args;

static void scatter_task(void *p, int t, int n)
{
    const scatter_args *q = p;
    ptrdiff_t r0, r1;
    share(q->R, t, n, &r0, &r1);
    scatter_t(q->isa, q->acc, q->ars, q->d, q->drs, q->idx, q->n, r0, r1);
}

void sg_scatter_t(float *acc, ptrdiff_t ars, const float *d, ptrdiff_t drs, ptrdiff_t R,
                  const int32_t *idx, ptrdiff_t n, int isa, int nthreads)
{
    scatter_args q = {acc, d, idx, ars, drs, R, n, isa};
    sg_parallel(scatter_task, &q, R * n >= 8192 ? nthreads : 1);
}

/* ------------------------------------------------------------------- GEMM */

typedef struct {
    const float *pa, *b;
    float *pb, *c;
    ptrdiff_t M, K, N, brs, crs;
    ptrdiff_t kc;                  /* K chunk: a tile sums kc values of k at a time */
    int accumulate, nq, nrmax, isa;
    int private_b;                 /* each thread packs all of B into a block of its own */
    sg_extras x;                   /* what rides along (none: zeros) */
#ifdef SG_X86
    const tile_fn *tiles;
#endif
} gemm_args;


/* column panel q: its first column and width (N in nq panels of nearly equal width) */
static inline void col_panel(const gemm_args *g, int q, ptrdiff_t *c0, int *w)
{
    ptrdiff_t base = g->N / g->nq, extra = g->N % g->nq;
    *c0 = q * base + (q < extra ? q : extra);
    *w = (int)(base + (q < extra ? 1 : 0));
}

/* the moves below use AVX2 where the GEMM runs (x86: the CPU has it) */
#ifdef SG_X86
#define SG_MOVES __attribute__((target("avx2")))
#else
#define SG_MOVES
#endif

/* rows [k0, k1) of B into the column panels at pb: b's, then (from kb on) more's */
SG_MOVES static void pack_b_panels(const gemm_args *g, float *pb, ptrdiff_t k0, ptrdiff_t k1)
{
    ptrdiff_t kb = g->K - g->x.kmore;
    for (int q = 0; q < g->nq; q++) {
        ptrdiff_t c0;
        int w;
        col_panel(g, q, &c0, &w);
        float *d = pb + g->K * c0;
        for (ptrdiff_t k = k0; k < k1; k++) {
            const float *src = k < kb ? g->b + k * g->brs : g->x.more + (k - kb) * g->x.mrs;
#ifdef SG_X86
            move16(d + k * w, src + c0, w);   /* w <= 14 */
#else
            memcpy(d + k * w, src + c0, (size_t)w * sizeof(float));
#endif
        }
    }
}

/* rows [k0, k1) of src (rows srs apart, N wide) copied into dst's (rows drs apart); rows
 * up to klim (>= k1) are the copier's next */
SG_MOVES static void keep_rows(float *dst, ptrdiff_t drs, const float *src, ptrdiff_t srs,
                               ptrdiff_t N, ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t klim)
{
    for (ptrdiff_t k = k0; k < k1; k++) {
        /* dst's rows are far apart (a step's columns of a (K, T*N) block) and their lines
         * were evicted since the step before wrote next to them: each is fetched, to be
         * written, 16 rows ahead (without it LSTM 512 lost 5-7 ms a batch) */
        if (k + 16 < klim) {
            const char *ahead = (const char *)(dst + (k + 16) * drs);
            for (size_t o = 0; o < (size_t)N * sizeof(float) + 63; o += 64)
                __builtin_prefetch(ahead + o, 1, 3);
        }
#ifdef SG_X86
        move_row(dst + k * drs, src + k * srs, N);
#else
        memcpy(dst + k * drs, src + k * srs, (size_t)N * sizeof(float));
#endif
    }
}

/* what rides along with B's rows [k0, k1), while they are in cache (rows up to klim are
 * this thread's next): b's rows only, not more's */
static void pack_b_extras(const gemm_args *g, ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t klim)
{
    const sg_extras *x = &g->x;
    ptrdiff_t kb = g->K - x->kmore;
    k1 = k1 < kb ? k1 : kb;
    klim = klim < kb ? klim : kb;
    if (k0 >= k1)
        return;
    if (x->keep)                     /* B's rows, in cache now, copied out */
        keep_rows(x->keep, x->krs, g->b, g->brs, g->N, k0, k1, klim);
    if (x->keep2)                    /* ... and the side block's, in cache beside them */
        keep_rows(x->keep2, x->k2rs, x->side, x->sdrs, g->N, k0, k1, klim);
    if (x->oh && x->oh->scatter)     /* ... and into the table's gradient (the side block's
                                      * rows, given one) */
        scatter_t(g->isa, x->oh->table, x->oh->trs, x->side ? x->side : g->b,
                  x->side ? x->sdrs : g->brs, x->oh->idx, g->N, k0, k1);
}

static void pack_b_task(void *p, int t, int n)
{
    const gemm_args *g = p;
    ptrdiff_t k0, k1;
    share(g->K, t, n, &k0, &k1);
    pack_b_panels(g, g->pb, k0, k1);
    pack_b_extras(g, k0, k1, k1);
}

/* Where the tile of column panel q over the K chunk at pa (kc values of k, of row panel pn;
 * the last chunk of it or not) prefetches into L2, a cache line per k: the tiles of columns
 * 1 and 2 fetch the chunk that comes next (a chunk is 2 kc lines), the rest of the panel's
 * or the first of the row panel the thread runs next (pnext; -1: none known), while the
 * current one, read once from L3 by column 0, is in L1 and L2; the others fetch their own
 * chunk again (a no-op). Without it, the first pass over each chunk waits on L3. */
static inline const char *prefetch(const gemm_args *g, const float *pa, ptrdiff_t kc, int last,
                                   ptrdiff_t pnext, int q)
{
    const float *next = !last ? pa + kc * SG_MR
                        : pnext >= 0 ? g->pa + pnext * SG_MR * g->K : NULL;
    if (!next || q < 1 || q > 2)
        return (const char *)pa;
    return (const char *)next + (size_t)(q - 1) * kc * 64;
}

/* row panel pn of C, from B packed at pb; pnext: the row panel this thread runs next */
static void gemm_panel(const gemm_args *g, const float *pb, ptrdiff_t pn, ptrdiff_t pnext)
{
#ifdef SG_X86
    const sg_extras *x = &g->x;
    /* the sums of a row panel's tiles between K chunks: a buffer per thread, kept and grown
     * (none: the whole of K in one pass) */
    ptrdiff_t KC = g->kc < g->K ? g->kc : g->K > 0 ? g->K : 1;
    static __thread float *acc = NULL;
    static __thread size_t acap = 0;
    if (KC < g->K && (size_t)g->N * SG_MR > acap) {
        float *na = aligned_alloc(64, (size_t)g->N * SG_MR * sizeof(float));
        if (na) {
            free(acc);
            acc = na;
            acap = (size_t)g->N * SG_MR;
        }
    }
    if (KC < g->K && (size_t)g->N * SG_MR > acap)
        KC = g->K;
    ptrdiff_t r0 = pn * SG_MR;
    int rows = g->M - r0 < SG_MR ? (int)(g->M - r0) : SG_MR;
    for (ptrdiff_t k0 = 0; k0 == 0 || k0 < g->K; k0 += KC) {   /* K = 0: one pass */
        ptrdiff_t kc = g->K - k0 < KC ? g->K - k0 : KC;
        int first = k0 == 0, last = k0 + kc >= g->K;
        const float *pa = g->pa + pn * SG_MR * g->K + k0 * SG_MR;
        for (int q = 0; q < g->nq; q++) {
            ptrdiff_t c0;
            int w;
            col_panel(g, q, &c0, &w);
            const float *add[14], *const *addp = NULL;
            if (last && x->oh && !x->oh->scatter) {   /* each column's token's table row */
                for (int j = 0; j < w; j++)
                    add[j] = x->oh->table + x->oh->idx[c0 + j] * x->oh->trs + r0;
                addp = add;
            }
            float *ct = g->c + r0 * g->crs + c0;
            const float *src = g->accumulate ? ct
                               : x->addend ? x->addend + r0 * x->ars + c0 : NULL;
            float *a = acc ? acc + c0 * SG_MR : NULL;
            g->tiles[w](pa, pb + g->K * c0 + k0 * w, kc, ct, g->crs, rows, src,
                        g->accumulate ? g->crs : x->ars, addp,
                        prefetch(g, pa, kc, last, pnext, q),
                        first ? NULL : a, last ? NULL : a);
        }
    }
#else
    (void)g; (void)pb; (void)pn; (void)pnext;
#endif
}

/* the rows of B whose extras ride along with row panel u of P: 16-aligned slices of K */
static inline void extras_rows(ptrdiff_t K, ptrdiff_t P, ptrdiff_t u, ptrdiff_t *k0,
                               ptrdiff_t *k1)
{
    *k0 = (K * u / P) & ~(ptrdiff_t)15;
    *k1 = u + 1 == P ? K : (K * (u + 1) / P) & ~(ptrdiff_t)15;
}

typedef struct {
    const gemm_args *g;
    int packed[SG_MAXT];           /* private B: thread t has packed all of B */
} panels_args;

/* Row panel u. With private B, a thread packs all of B into a block of its own before its
 * first panel (no rows packed by the other core to fetch from its cache, and no wait for
 * it), and each panel brings its slice of what rides along with B's rows. */
static void gemm_unit(void *p, ptrdiff_t u, int t, ptrdiff_t next)
{
    panels_args *a = p;
    const gemm_args *g = a->g;
    const float *pb = g->pb;
    if (g->private_b) {
        float *mine = g->pb + (size_t)t * g->K * g->N;
        if (!a->packed[t]) {
            pack_b_panels(g, mine, 0, g->K);
            a->packed[t] = 1;
        }
        ptrdiff_t P = (g->M + SG_MR - 1) / SG_MR, kb = g->K - g->x.kmore, k0, k1, n0, klim;
        extras_rows(kb, P, u, &k0, &k1);
        klim = k1;                   /* the prefetch runs on into the next slice, if ours */
        if (next == u + 1)
            extras_rows(kb, P, next, &n0, &klim);
        pack_b_extras(g, k0, k1, klim);
        pb = mine;
    }
    gemm_panel(g, pb, u, next);
}

/* whether rows p[i*rs + j] (i < m, j < w) and q[i*qs + j] (i < k, j < v) may share memory
 * (their spans of addresses meet); a NULL block shares none */
static int overlaps(const float *p, ptrdiff_t m, ptrdiff_t rs, ptrdiff_t w, const float *q,
                    ptrdiff_t k, ptrdiff_t qs, ptrdiff_t v)
{
    if (!p || !q)
        return 0;
    uintptr_t p0 = (uintptr_t)p, p1 = (uintptr_t)(p + (m - 1) * rs + w);
    uintptr_t q0 = (uintptr_t)q, q1 = (uintptr_t)(q + (k - 1) * qs + v);
    return m > 0 && k > 0 && p0 < q1 && q0 < p1;
}

/* whether C (M, N) or the addend shares memory with what a thread may still read or write
 * while it packs B (K, N): B (b's rows and more's), the side block, keep and keep2; then no
 * thread may multiply before all have packed */
static int meets_packing(const float *c, ptrdiff_t M, ptrdiff_t crs, const float *b,
                         ptrdiff_t K, ptrdiff_t brs, ptrdiff_t N, const sg_extras *x)
{
    if (x) {                         /* b has K - kmore rows, more the rest */
        if (overlaps(c, M, crs, N, x->more, x->kmore, x->mrs, N))
            return 1;
        K -= x->kmore;
    }
    if (overlaps(c, M, crs, N, b, K, brs, N))
        return 1;
    if (!x)
        return 0;
    const float *read[] = {x->side, x->keep, x->keep2};
    const ptrdiff_t rs[] = {x->sdrs, x->krs, x->k2rs};
    for (int i = 0; i < 3; i++)
        if (overlaps(c, M, crs, N, read[i], K, rs[i], N) ||
            (i > 0 && overlaps(x->addend, M, x->ars, N, read[i], K, rs[i], N)))
            return 1;
    return 0;
}

int sg_gemm(const float *pa, ptrdiff_t M, ptrdiff_t K, const float *b, ptrdiff_t brs,
            ptrdiff_t N, float *c, ptrdiff_t crs, int accumulate, const sg_extras *x, int isa,
            int nthreads)
{
#ifdef SG_X86
    if (M <= 0 || N <= 0)
        return 0;
    gemm_args g = {.pa = pa, .b = b, .c = c, .M = M, .K = K, .N = N, .brs = brs, .crs = crs,
                   .accumulate = accumulate, .isa = isa};
    if (x)
        g.x = *x;
    g.nrmax = isa == SG_ISA_AVX512 ? 14 : 6;
    g.tiles = isa == SG_ISA_AVX512 ? TILES512 : TILES256;
    g.nq = (int)((N + g.nrmax - 1) / g.nrmax);
    g.kc = isa == SG_ISA_AVX2 ? SG_KC_AVX2 : K;
    /* the packed B: a buffer per calling thread, kept and grown (a fresh 400 KB block per
     * call was an mmap and its page faults) */
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    ptrdiff_t P = (M + SG_MR - 1) / SG_MR;
    int n = nthreads < 1 ? 1 : nthreads;
    if (n > P)
        n = (int)P;
    /* each thread packs all of B for itself, unless C or an addend shares memory with
     * what the other threads still read or write as they pack (then all pack, then all
     * multiply, as before) */
    g.private_b = n > 1 && !meets_packing(c, M, crs, b, K, brs, N, x);
    size_t need = (size_t)K * N * (g.private_b ? n : 1);
    if (need > cap) {
        float *nb = aligned_alloc(64, (need * sizeof(float) + 63) / 64 * 64);
        if (!nb)
            return -1;
        free(buf);
        buf = nb;
        cap = need;
    }
    g.pb = buf;
    if (!g.private_b)                /* all pack (and what rides along), then all multiply */
        sg_parallel(pack_b_task, &g, n);
    panels_args a = {.g = &g};
    sg_run(gemm_unit, &a, P, n);
    return 0;
#else
    (void)pa; (void)M; (void)K; (void)b; (void)brs; (void)N; (void)c; (void)crs;
    (void)accumulate; (void)x; (void)isa; (void)nthreads;
    return -1;
#endif
}
