/* Fused float32 cell kernels for the CPU: engine.layers.kernels._native.
 *
 * Each function here is one pass over a step's (rows, B) arrays doing all of one
 * cell's gate maths (forward or backward), where the NumPy formulas of
 * engine/layers/cells.py make one pass per operation and write temporaries. The
 * formulas are those of cells.py, operation for operation; the tests
 * (tests/test_kernels.py) compare the two.
 *
 * Arrays are 2-D float32 with contiguous rows (column stride 4 bytes) and any row
 * stride, so column slices of the layers' step blocks pass without copies. Python
 * (engine/layers/kernels/__init__.py) checks that before calling and uses the NumPy
 * formulas otherwise; here a mismatch raises.
 *
 * Threads: the kernels release the GIL and start no threads of their own. Inside a step
 * loop that runs the packed step GEMM they split their rows over that GEMM's pool
 * (sg_parallel, g_threads below) when a call is large enough; elsewhere they run on the
 * calling thread. (An OpenMP pool beside OpenBLAS's made steps slower; see docs/speed.md.)
 * The loops run a function compiled for AVX-512, AVX2+FMA and baseline x86-64 (MULTI
 * below: the CPU's best, or a lower one asked for), so the binary runs on any x86-64
 * CPU. When every array of a call is a contiguous block (row stride B), each gate block
 * is one run of H·B floats and is processed as one row, without a remainder per row of B.
 *
 * tanh is computed here (a rational function, see tanh_f), not by libm, so that the
 * loops vectorise, and σ(x) = 0.5 tanh(x / 2) + 0.5, as the NumPy formulas compute it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>
#include <stdint.h>

#include "stepgemm.h"

/* the interface's version: engine/layers/kernels/__init__.py refuses a build of another one */
#define KERNELS_VERSION 15

/* The instruction set the loops below run with: 3 AVX-512 (x86-64-v4), 2 AVX2 + FMA
 * (x86-64-v3), 1 baseline x86-64. MULTI compiles a loop once per level (its body inlined
 * into a function built for that level) and calls the copy of cell_isa; cell_isa starts at
 * the CPU's best (cpu_level) and may be lowered (py_cell_isa: RNN_ENGINE_CELL_ISA, e.g. an
 * AVX-512 CPU held to what an AVX2 one runs). Without GCC on x86-64 Linux: one copy, the
 * compiler's default, and the level stays 1. */
static int cell_isa = 1, cpu_level = 1;   /* both set from cpu_isa() when the module loads */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HAVE_MULTI 1
#define MULTI(name, params, args)                                                          \
    static inline __attribute__((always_inline)) void name##_body params;                 \
    __attribute__((target("arch=x86-64-v4"))) static void name##_v4 params { name##_body args; } \
    __attribute__((target("arch=x86-64-v3"))) static void name##_v3 params { name##_body args; } \
    static void name##_v1 params { name##_body args; }                                     \
    static void name params                                                                \
    {                                                                                      \
        if (cell_isa >= 3)                                                                 \
            name##_v4 args;                                                                \
        else if (cell_isa == 2)                                                            \
            name##_v3 args;                                                                \
        else                                                                               \
            name##_v1 args;                                                                \
    }                                                                                      \
    static inline __attribute__((always_inline)) void name##_body params
#else
#define HAVE_MULTI 0
#define MULTI(name, params, args) static void name params
#endif

/* the best level of this CPU */
static int cpu_isa(void)
{
#if HAVE_MULTI
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return 3;
    if (__builtin_cpu_supports("x86-64-v3"))
        return 2;
#endif
    return 1;
}

/* ------------------------------------------------------------------ maths */

/* tanh(x) = x P(x²) / Q(x²) on |x| <= 9 (beyond, |tanh x| rounds to 1 in float32), the
 * result clamped to [-1, 1]. P and Q are of degree 4; their coefficients are a minimax fit
 * of the relative error on [0, 9] made by fit_tanh.py beside this file (float64 error
 * 2e-8; evaluated in float32 at most 6 ulp from the true tanh, which the tests check).
 * Comparisons are written so that a NaN falls through them: NaN gives NaN, ±inf ±1. */
static inline float tanh_f(float x)
{
    float a = x > 9.0f ? 9.0f : x;
    a = a < -9.0f ? -9.0f : a;
    float s = a * a;
    float p = 1.335319233e-08f;
    p = p * s + 2.060803854e-05f;
    p = p * s + 3.495526267e-03f;
    p = p * s + 1.338097453e-01f;
    p = p * s + 1.0f;
    float q = 7.775960285e-07f;
    q = q * s + 3.285532293e-04f;
    q = q * s + 2.587674931e-02f;
    q = q * s + 4.671429098e-01f;
    q = q * s + 1.0f;
    float y = a * p / q;
    y = y > 1.0f ? 1.0f : y;
    return y < -1.0f ? -1.0f : y;
}

static inline float sigmoid_f(float x)
{
    return 0.5f * tanh_f(0.5f * x) + 0.5f;
}

/* --------------------------------------------------------- array handling */

typedef struct {
    float *p;
    Py_ssize_t rs;      /* row stride, in floats */
} mat;

#define AT(m, i) ((m).p + (i) * (m).rs)

/* rows [r0, r1) of one kernel; the column count is B */
typedef void (*rows_fn)(const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0, Py_ssize_t r1,
                        int flag);

/* Run f over all H rows of the n arrays in a. When every array's rows are B apart, gate k
 * of an array is the run of H·B floats at p + k·H·B: then f sees one row of H·B columns
 * (and a row stride of H·B, so that its row index k·1 lands on gate k). */
/* The threads the cell kernels split their rows over (kernel_threads(n), set per step loop
 * by Python), when a gate block has at least PAR_MIN floats; the pool is stepgemm.c's. */
static int g_threads = 1;
#define MAXARGS 12  /* the most array arguments of a kernel (step_gemm: 10) */
#define PAR_MIN 8192

/* fn over the rows of a block of n floats, on the kernels' threads when it is large
 * enough, without the GIL */
static void over_rows(void (*fn)(void *, int, int), void *q, Py_ssize_t n)
{
    Py_BEGIN_ALLOW_THREADS
    if (g_threads > 1 && n >= PAR_MIN)
        sg_parallel(fn, q, g_threads);
    else
        fn(q, 0, 1);
    Py_END_ALLOW_THREADS
}

typedef struct {
    rows_fn f;
    const mat *a;
    int n, flat, flag;
    Py_ssize_t H, B;
} rows_task;

/* thread t's run [*c0, *c1) of L floats split over nt threads: starts 16-aligned (whole
 * vectors), the last run to the end */
static void run16(Py_ssize_t L, int t, int nt, Py_ssize_t *c0, Py_ssize_t *c1)
{
    *c0 = (L * t / nt) & ~(Py_ssize_t)15;
    *c1 = t + 1 == nt ? L : (L * (t + 1) / nt) & ~(Py_ssize_t)15;
}

/* thread t's share: rows (or, flat, a run of columns 16-aligned) */
static void rows_part(void *p, int t, int nt)
{
    const rows_task *q = p;
    if (!q->flat) {
        q->f(q->a, q->H, q->B, q->H * t / nt, q->H * (t + 1) / nt, q->flag);
        return;
    }
    Py_ssize_t L = q->H * q->B, c0, c1;
    run16(L, t, nt, &c0, &c1);
    if (c1 <= c0)
        return;
    mat part[MAXARGS];
    for (int k = 0; k < q->n; k++) {
        part[k].p = q->a[k].p ? q->a[k].p + c0 : NULL;
        part[k].rs = L;
    }
    q->f(part, 1, c1 - c0, 0, 1, q->flag);
}

static void run_rows(rows_fn f, mat *a, int n, Py_ssize_t H, Py_ssize_t B, int flag)
{
    int flat = 1;
    for (int k = 0; k < n; k++)
        if (a[k].p && a[k].rs != B)
            flat = 0;
    flat = flat && H > 1;
    if (flat)
        for (int k = 0; k < n; k++)
            a[k].rs = H * B;
    rows_task q = {f, a, n, flat, flag, flat ? 1 : H, flat ? H * B : B};
    if (g_threads > 1 && H * B >= PAR_MIN) {
        q.H = H;
        q.B = B;
        sg_parallel(rows_part, &q, g_threads);
        return;
    }
    f(a, q.H, q.B, 0, q.H, flag);
}

/* Fill m from a 2-D float32 buffer of shape (rows, B) with contiguous rows. */
static int get_mat(PyObject *o, Py_buffer *view, int writable, Py_ssize_t rows, Py_ssize_t B,
                   mat *m, const char *name)
{
    if (PyObject_GetBuffer(o, view, PyBUF_RECORDS_RO | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format;
    if (f && (f[0] == '<' || f[0] == '=' || f[0] == '@'))
        f++;
    if (view->ndim != 2 || view->itemsize != 4 || !f || strcmp(f, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: a 2-D float32 array is needed", name);
        goto bad;
    }
    if (view->shape[0] != rows || view->shape[1] != B) {
        PyErr_Format(PyExc_ValueError, "%s: shape (%zd, %zd), expected (%zd, %zd)", name,
                     view->shape[0], view->shape[1], rows, B);
        goto bad;
    }
    if ((B > 1 && view->strides[1] != 4) || view->strides[0] % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: rows must be contiguous", name);
        goto bad;
    }
    m->p = (float *)view->buf;
    m->rs = view->strides[0] / 4;
    return 0;
bad:
    PyBuffer_Release(view);
    view->obj = NULL;
    return -1;
}

typedef struct {
    Py_buffer v[MAXARGS];
    int n;
} views;

static void release(views *vs)
{
    for (int k = 0; k < vs->n; k++)
        if (vs->v[k].obj)
            PyBuffer_Release(&vs->v[k]);
    vs->n = 0;
}

/* The next view of vs, empty (release skips it until a getter fills it). */
static Py_buffer *slot(views *vs)
{
    Py_buffer *v = &vs->v[vs->n++];
    v->obj = NULL;
    return v;
}

/* One argument: (object, writable, rows); None is allowed where optional. */
static int take(views *vs, mat *m, PyObject *o, int writable, Py_ssize_t rows, Py_ssize_t B,
                const char *name, int optional)
{
    if (optional && o == Py_None) {
        m->p = NULL;
        m->rs = 0;
        return 0;
    }
    return get_mat(o, slot(vs), writable, rows, B, m, name);
}

/* Each kernel is a function of one row (B columns, restrict pointers, so that the loop
 * vectorises) and a function of rows r0..r1 that one thread runs. */

/* ------------------------------------------------------------------- RNN */

static inline void tanh_row(float *restrict p, Py_ssize_t B)
{
    for (Py_ssize_t j = 0; j < B; j++)
        p[j] = tanh_f(p[j]);
}

static inline void relu_row(float *restrict p, Py_ssize_t B)
{
    for (Py_ssize_t j = 0; j < B; j++)
        p[j] = p[j] < 0.0f ? 0.0f : p[j];
}

/* a: 0 pre (in: W_x x + b + W_h h, out: h') */
MULTI(rnn_fwd_rows,
      (const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0,
       Py_ssize_t r1, int relu),
      (a, H, B, r0, r1, relu))
{
    for (Py_ssize_t i = r0; i < r1; i++) {
        if (relu)
            relu_row(AT(a[0], i), B);
        else
            tanh_row(AT(a[0], i), B);
    }
}

static inline void rnn_bwd_row(const float *restrict dh, const float *restrict h,
                               float *restrict d, Py_ssize_t B, int relu)
{
    if (relu)
        for (Py_ssize_t j = 0; j < B; j++)
            d[j] = h[j] > 0.0f ? dh[j] : 0.0f * dh[j];
    else
        for (Py_ssize_t j = 0; j < B; j++)
            d[j] = (1.0f - h[j] * h[j]) * dh[j];
}

/* a: 0 dh', 1 h', 2 out dpre */
MULTI(rnn_bwd_rows,
      (const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0,
       Py_ssize_t r1, int relu),
      (a, H, B, r0, r1, relu))
{
    for (Py_ssize_t i = r0; i < r1; i++)
        rnn_bwd_row(AT(a[0], i), AT(a[1], i), AT(a[2], i), B, relu);
}

/* ------------------------------------------------------------------- GRU */

static inline void gru_fwd_row(const float *restrict xz, const float *restrict xr,
                               const float *restrict xc, float *restrict hz, float *restrict hr,
                               const float *restrict hc, const float *restrict h,
                               float *restrict hn, float *restrict c, Py_ssize_t B)
{
    for (Py_ssize_t j = 0; j < B; j++) {
        float z = sigmoid_f(hz[j] + xz[j]);
        float r = sigmoid_f(hr[j] + xr[j]);
        float cc = tanh_f(r * hc[j] + xc[j]);
        hz[j] = z;
        hr[j] = r;
        c[j] = cc;
        hn[j] = (h[j] - cc) * z + cc;
    }
}

/* a: 0 xproj (3H), 1 hproj (3H; out: rows 0..2H hold z, r), 2 h, 3 out h', 4 out c */
MULTI(gru_fwd_rows,
      (const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0,
       Py_ssize_t r1, int flag),
      (a, H, B, r0, r1, flag))
{
    (void)flag;
    for (Py_ssize_t i = r0; i < r1; i++)
        gru_fwd_row(AT(a[0], i), AT(a[0], H + i), AT(a[0], 2 * H + i), AT(a[1], i),
                    AT(a[1], H + i), AT(a[1], 2 * H + i), AT(a[2], i), AT(a[3], i), AT(a[4], i), B);
}

static inline void gru_bwd_row(const float *restrict dh, const float *restrict h,
                               const float *restrict zz, const float *restrict rr,
                               const float *restrict c, const float *restrict hc,
                               float *restrict dxz, float *restrict dxr, float *restrict dxc,
                               float *restrict dhz, float *restrict dhr, float *restrict dhc,
                               float *restrict dd, Py_ssize_t B)
{
    for (Py_ssize_t j = 0; j < B; j++) {
        float z = zz[j], r = rr[j], g = dh[j];
        float dc = (1.0f - c[j] * c[j]) * g;
        dc = dc - dc * z;
        float dz = (h[j] - c[j]) * g * (z - z * z);
        float dr = dc * hc[j] * (r - r * r);
        dxz[j] = dz;
        dxr[j] = dr;
        dxc[j] = dc;
        dhz[j] = dz;
        dhr[j] = dr;
        dhc[j] = dc * r;
        dd[j] = g * z;
    }
}

/* a: 0 dh', 1 h, 2 zr (2H), 3 c, 4 hc, 5 out dxproj (3H), 6 out dhproj (3H), 7 out dh direct */
MULTI(gru_bwd_rows,
      (const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0,
       Py_ssize_t r1, int flag),
      (a, H, B, r0, r1, flag))
{
    (void)flag;
    for (Py_ssize_t i = r0; i < r1; i++)
        gru_bwd_row(AT(a[0], i), AT(a[1], i), AT(a[2], i), AT(a[2], H + i), AT(a[3], i),
                    AT(a[4], i), AT(a[5], i), AT(a[5], H + i), AT(a[5], 2 * H + i), AT(a[6], i),
                    AT(a[6], H + i), AT(a[6], 2 * H + i), AT(a[7], i), B);
}

/* ------------------------------------------------------------------ LSTM */

static inline void lstm_fwd_row(float *restrict pi, float *restrict pf, float *restrict po,
                                float *restrict pg, const float *restrict c, float *restrict hn,
                                float *restrict cn, float *restrict tc, Py_ssize_t B)
{
    for (Py_ssize_t j = 0; j < B; j++) {
        float ig = sigmoid_f(pi[j]), fg = sigmoid_f(pf[j]), og = sigmoid_f(po[j]);
        float gg = tanh_f(pg[j]);
        float cc = fg * c[j] + ig * gg;
        float t = tanh_f(cc);
        pi[j] = ig;
        pf[j] = fg;
        po[j] = og;
        pg[j] = gg;
        cn[j] = cc;
        tc[j] = t;
        hn[j] = og * t;
    }
}

/* a: 0 pre (4H; out: rows i, f, o gates, g = tanh), 1 c, 2 out h', 3 out c', 4 out tanh(c') */
MULTI(lstm_fwd_rows,
      (const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0,
       Py_ssize_t r1, int flag),
      (a, H, B, r0, r1, flag))
{
    (void)flag;
    for (Py_ssize_t i = r0; i < r1; i++)
        lstm_fwd_row(AT(a[0], i), AT(a[0], H + i), AT(a[0], 2 * H + i), AT(a[0], 3 * H + i),
                     AT(a[1], i), AT(a[2], i), AT(a[3], i), AT(a[4], i), B);
}

/* dc may be NULL (no gradient from a later step) */
static inline void lstm_bwd_row(const float *restrict dh, const float *restrict dc,
                                const float *restrict c, const float *restrict ii,
                                const float *restrict ff, const float *restrict oo,
                                const float *restrict gg, const float *restrict tc,
                                float *restrict di, float *restrict df, float *restrict dO,
                                float *restrict dg, float *restrict dcp, Py_ssize_t B)
{
    for (Py_ssize_t j = 0; j < B; j++) {
        float o = oo[j], t = tc[j], g = dh[j], in = ii[j], f = ff[j], gv = gg[j];
        dO[j] = g * t * ((1.0f - o) * o);
        float dct = (1.0f - t * t) * o * g;
        if (dc)
            dct += dc[j];
        di[j] = dct * gv * ((1.0f - in) * in);
        df[j] = dct * c[j] * ((1.0f - f) * f);
        dg[j] = dct * ((1.0f - gv * gv) * in);
        dcp[j] = dct * f;
    }
}

/* a: 0 dh', 1 dc' (p NULL when there is none), 2 c, 3 ifo (3H), 4 g, 5 tanh(c'),
 *    6 out dpre (4H), 7 out dc */
MULTI(lstm_bwd_rows,
      (const mat *a, Py_ssize_t H, Py_ssize_t B, Py_ssize_t r0,
       Py_ssize_t r1, int flag),
      (a, H, B, r0, r1, flag))
{
    (void)flag;
    for (Py_ssize_t i = r0; i < r1; i++)
        lstm_bwd_row(AT(a[0], i), a[1].p ? AT(a[1], i) : NULL, AT(a[2], i), AT(a[3], i),
                     AT(a[3], H + i), AT(a[3], 2 * H + i), AT(a[4], i), AT(a[5], i), AT(a[6], i),
                     AT(a[6], H + i), AT(a[6], 2 * H + i), AT(a[6], 3 * H + i), AT(a[7], i), B);
}

/* --------------------------------------------------------------- wrappers */

/* shape (rows, B) of an array argument, from its buffer */
static int shape_of(PyObject *o, Py_ssize_t *rows, Py_ssize_t *B)
{
    Py_buffer v;
    if (PyObject_GetBuffer(o, &v, PyBUF_RECORDS_RO) < 0)
        return -1;
    int ok = v.ndim == 2;
    if (ok) {
        *rows = v.shape[0];
        *B = v.shape[1];
    }
    PyBuffer_Release(&v);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "a 2-D array is needed");
        return -1;
    }
    return 0;
}

/* One cell kernel's arguments, in call order: each a (rows·H, B) float32 array, read or
 * written, or None where optional; H and B are read off argument `shape_arg` (H rows). */
typedef struct {
    const char *name;
    int rows;           /* in units of H */
    int writable;
    int optional;       /* None allowed (its mat's p is then NULL) */
} argspec;

typedef struct {
    const char *fname;
    rows_fn fn;
    int nargs;
    int shape_arg;
    int bool_flag;      /* a last bool argument is the kernel's flag (relu) */
    int flag_arg;       /* or: the flag says whether this optional argument is given; -1 none */
    argspec a[MAXARGS];
} kernel;

/* Check a kernel's arguments against its spec and run it over all rows, the GIL released. */
static PyObject *call_kernel(const kernel *k, PyObject *args)
{
    Py_ssize_t given = PyTuple_GET_SIZE(args), want = k->nargs + (k->bool_flag ? 1 : 0);
    if (given != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", k->fname, want,
                     given);
        return NULL;
    }
    int flag = 0;
    if (k->bool_flag && (flag = PyObject_IsTrue(PyTuple_GET_ITEM(args, k->nargs))) < 0)
        return NULL;
    Py_ssize_t H, B;
    if (shape_of(PyTuple_GET_ITEM(args, k->shape_arg), &H, &B) < 0)
        return NULL;
    views vs = {.n = 0};
    mat m[MAXARGS];
    for (int i = 0; i < k->nargs; i++) {
        const argspec *s = &k->a[i];
        if (take(&vs, &m[i], PyTuple_GET_ITEM(args, i), s->writable, s->rows * H, B, s->name,
                 s->optional) < 0) {
            release(&vs);
            return NULL;
        }
    }
    if (k->flag_arg >= 0)
        flag = m[k->flag_arg].p != NULL;
    Py_BEGIN_ALLOW_THREADS
    run_rows(k->fn, m, k->nargs, H, B, flag);
    Py_END_ALLOW_THREADS
    release(&vs);
    Py_RETURN_NONE;
}

static const kernel RNN_FORWARD = {"rnn_forward", rnn_fwd_rows, 1, 0, 1, -1,
                                   {{"pre", 1, 1, 0}}};
static const kernel RNN_BACKWARD = {"rnn_backward", rnn_bwd_rows, 3, 1, 1, -1,
                                    {{"dh", 1, 0, 0}, {"h", 1, 0, 0}, {"out", 1, 1, 0}}};
static const kernel GRU_FORWARD = {
    "gru_forward", gru_fwd_rows, 5, 2, 0, -1,
    {{"xproj", 3, 0, 0}, {"hproj", 3, 1, 0}, {"h", 1, 0, 0}, {"h_new", 1, 1, 0}, {"c", 1, 1, 0}}};
static const kernel GRU_BACKWARD = {
    "gru_backward", gru_bwd_rows, 8, 1, 0, -1,
    {{"dh", 1, 0, 0}, {"h", 1, 0, 0}, {"zr", 2, 0, 0}, {"c", 1, 0, 0}, {"hc", 1, 0, 0},
     {"dxproj", 3, 1, 0}, {"dhproj", 3, 1, 0}, {"direct", 1, 1, 0}}};
static const kernel LSTM_FORWARD = {
    "lstm_forward", lstm_fwd_rows, 5, 1, 0, -1,
    {{"pre", 4, 1, 0}, {"c", 1, 0, 0}, {"h_new", 1, 1, 0}, {"c_new", 1, 1, 0}, {"tc", 1, 1, 0}}};
static const kernel LSTM_BACKWARD = {
    "lstm_backward", lstm_bwd_rows, 8, 2, 0, 1,
    {{"dh", 1, 0, 0}, {"dc", 1, 0, 1}, {"c", 1, 0, 0}, {"ifo", 3, 0, 0}, {"g", 1, 0, 0},
     {"tc", 1, 0, 0}, {"dpre", 4, 1, 0}, {"dc_prev", 1, 1, 0}}};
/* the kernels' tanh of an array, in place (for the tests of tanh_f): the RNN's forward */
static const kernel TANH = {"tanh", rnn_fwd_rows, 1, 0, 0, -1, {{"a", 1, 1, 0}}};

static PyObject *py_rnn_forward(PyObject *self, PyObject *args)
{
    return call_kernel(&RNN_FORWARD, args);
}

static PyObject *py_rnn_backward(PyObject *self, PyObject *args)
{
    return call_kernel(&RNN_BACKWARD, args);
}

static PyObject *py_gru_forward(PyObject *self, PyObject *args)
{
    return call_kernel(&GRU_FORWARD, args);
}

static PyObject *py_gru_backward(PyObject *self, PyObject *args)
{
    return call_kernel(&GRU_BACKWARD, args);
}

static PyObject *py_lstm_forward(PyObject *self, PyObject *args)
{
    return call_kernel(&LSTM_FORWARD, args);
}

static PyObject *py_lstm_backward(PyObject *self, PyObject *args)
{
    return call_kernel(&LSTM_BACKWARD, args);
}

static PyObject *py_tanh(PyObject *self, PyObject *args)
{
    return call_kernel(&TANH, args);
}

/* ------------------------------------------------ one-hot input projections */

/* A one-hot input x_n = e_{idx[n]} projects to W x_n = column idx[n] of W, so the layers
 * (engine/layers/recurrent.py) gather those columns instead of running a GEMM over
 * the zeros of x, and scatter-add the gradient's columns instead of the GEMM dpre x^T. */

/* out[r, j] = table[r, idx[j]] (add: +=) for rows r0..r1, j < n. (AVX-512 gathers,
 * written out with intrinsics, measured no faster than this loop on the project's CPU.) */
MULTI(gather_cols_rows,
      (float *out, Py_ssize_t ors, const float *table,
       Py_ssize_t trs, const int32_t *restrict idx, Py_ssize_t n,
       Py_ssize_t r0, Py_ssize_t r1, int add),
      (out, ors, table, trs, idx, n, r0, r1, add))
{
    for (Py_ssize_t r = r0; r < r1; r++) {
        const float *restrict t = table + r * trs;
        float *restrict o = out + r * ors;
        if (add)
            for (Py_ssize_t j = 0; j < n; j++)
                o[j] += t[idx[j]];
        else
            for (Py_ssize_t j = 0; j < n; j++)
                o[j] = t[idx[j]];
    }
}

/* out = a^T for a (R, C) and out (C, R), both with contiguous rows: 8 x 8 tiles
 * transposed in AVX registers where the CPU has AVX2 (24 shuffles per 64 numbers), the
 * edges and other CPUs one number at a time, in 32 x 32 tiles so that reads and writes
 * stay in cache lines already loaded. */
static void transpose_scalar(float *out, Py_ssize_t ors, const float *a, Py_ssize_t ars,
                             Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, Py_ssize_t j1)
{
    const Py_ssize_t TB = 32;
    for (Py_ssize_t ib = i0; ib < i1; ib += TB) {
        Py_ssize_t ie = ib + TB < i1 ? ib + TB : i1;
        for (Py_ssize_t jb = j0; jb < j1; jb += TB) {
            Py_ssize_t je = jb + TB < j1 ? jb + TB : j1;
            for (Py_ssize_t j = jb; j < je; j++) {
                float *restrict o = out + j * ors;
                for (Py_ssize_t i = ib; i < ie; i++)
                    o[i] = a[i * ars + j];
            }
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX_TRANSPOSE 1
__attribute__((target("avx2"))) static void transpose_avx(float *out, Py_ssize_t ors,
                                                          const float *a, Py_ssize_t ars,
                                                          Py_ssize_t R, Py_ssize_t C)
{
    Py_ssize_t R8 = R - R % 8, C8 = C - C % 8;
    for (Py_ssize_t i = 0; i < R8; i += 8) {
        const float *p = a + i * ars;
        for (Py_ssize_t j = 0; j < C8; j += 8) {
            __m256 r0 = _mm256_loadu_ps(p + 0 * ars + j), r1 = _mm256_loadu_ps(p + 1 * ars + j);
            __m256 r2 = _mm256_loadu_ps(p + 2 * ars + j), r3 = _mm256_loadu_ps(p + 3 * ars + j);
            __m256 r4 = _mm256_loadu_ps(p + 4 * ars + j), r5 = _mm256_loadu_ps(p + 5 * ars + j);
            __m256 r6 = _mm256_loadu_ps(p + 6 * ars + j), r7 = _mm256_loadu_ps(p + 7 * ars + j);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *q = out + j * ors + i;
            _mm256_storeu_ps(q + 0 * ors, _mm256_permute2f128_ps(s0, s4, 0x20));
            _mm256_storeu_ps(q + 1 * ors, _mm256_permute2f128_ps(s1, s5, 0x20));
            _mm256_storeu_ps(q + 2 * ors, _mm256_permute2f128_ps(s2, s6, 0x20));
            _mm256_storeu_ps(q + 3 * ors, _mm256_permute2f128_ps(s3, s7, 0x20));
            _mm256_storeu_ps(q + 4 * ors, _mm256_permute2f128_ps(s0, s4, 0x31));
            _mm256_storeu_ps(q + 5 * ors, _mm256_permute2f128_ps(s1, s5, 0x31));
            _mm256_storeu_ps(q + 6 * ors, _mm256_permute2f128_ps(s2, s6, 0x31));
            _mm256_storeu_ps(q + 7 * ors, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
    }
    transpose_scalar(out, ors, a, ars, 0, R8, C8, C);   /* the right edge */
    transpose_scalar(out, ors, a, ars, R8, R, 0, C);    /* the bottom edge */
}
#endif

static void transpose_tiles(float *out, Py_ssize_t ors, const float *a, Py_ssize_t ars,
                            Py_ssize_t R, Py_ssize_t C)
{
#ifdef HAVE_AVX_TRANSPOSE
    if (__builtin_cpu_supports("avx2")) {
        transpose_avx(out, ors, a, ars, R, C);
        return;
    }
#endif
    transpose_scalar(out, ors, a, ars, 0, R, 0, C);
}

/* A 1-D int32 buffer of n indices, each in [0, V). */
static int get_idx(PyObject *o, Py_buffer *view, Py_ssize_t V, const int32_t **idx, Py_ssize_t *n)
{
    if (PyObject_GetBuffer(o, view, PyBUF_RECORDS_RO) < 0)
        return -1;
    const char *f = view->format;
    if (f && (f[0] == '<' || f[0] == '=' || f[0] == '@'))
        f++;
    if (view->ndim != 1 || view->itemsize != 4 || !f || strcmp(f, "i") != 0 ||
        (view->shape[0] > 1 && view->strides[0] != 4)) {
        PyErr_SetString(PyExc_TypeError, "idx: a contiguous 1-D int32 array is needed");
        goto bad;
    }
    const int32_t *p = (const int32_t *)view->buf;
    for (Py_ssize_t j = 0; j < view->shape[0]; j++)
        if (p[j] < 0 || p[j] >= V) {
            PyErr_Format(PyExc_IndexError, "idx[%zd] = %d is outside the table's %zd columns", j,
                         (int)p[j], V);
            goto bad;
        }
    *idx = p;
    *n = view->shape[0];
    return 0;
bad:
    PyBuffer_Release(view);
    view->obj = NULL;
    return -1;
}

/* The gather over a table (R, V) and columns (R, n), by idx (n,): out = cols (+)=
 * table[:, idx]. (Its gradient, the scatter-add, is stepgemm.c's sg_scatter_t, into the
 * transposed table.) */
typedef struct {
    const mat *m;
    const int32_t *idx;
    Py_ssize_t n, R;
    int add;
} columns_task;

static void columns_part(void *p, int t, int nt)
{
    const columns_task *q = p;
    Py_ssize_t r0 = q->R * t / nt, r1 = q->R * (t + 1) / nt;
    gather_cols_rows(q->m[1].p, q->m[1].rs, q->m[0].p, q->m[0].rs, q->idx, q->n, r0, r1,
                     q->add);
}

static PyObject *columns_call(PyObject *tab_o, PyObject *cols_o, PyObject *ido, int add)
{
    Py_ssize_t R, V;
    if (shape_of(tab_o, &R, &V) < 0)
        return NULL;
    views vs = {.n = 0};
    mat m[2];
    const int32_t *idx;
    Py_ssize_t n;
    if (get_idx(ido, slot(&vs), V, &idx, &n) < 0)
        goto fail;
    if (take(&vs, &m[0], tab_o, 0, R, V, "table", 0) < 0 ||
        take(&vs, &m[1], cols_o, 1, R, n, "out", 0) < 0)
        goto fail;
    columns_task q = {m, idx, n, R, add};
    over_rows(columns_part, &q, R * n);   /* each thread its rows: no shared writes */
    release(&vs);
    Py_RETURN_NONE;
fail:
    release(&vs);
    return NULL;
}

/* gather(out, table, idx, add): out (R, n) (+)= the columns idx of table (R, V) */
static PyObject *py_gather(PyObject *self, PyObject *args)
{
    PyObject *out, *table, *ido;
    int add;
    if (!PyArg_ParseTuple(args, "OOOp", &out, &table, &ido, &add))
        return NULL;
    return columns_call(table, out, ido, add);
}

/* transpose(out, a): out (C, R) = a (R, C)^T */
static PyObject *py_transpose(PyObject *self, PyObject *args)
{
    PyObject *out, *a;
    if (!PyArg_ParseTuple(args, "OO", &out, &a))
        return NULL;
    Py_ssize_t R, C;
    if (shape_of(a, &R, &C) < 0)
        return NULL;
    views vs = {.n = 0};
    mat m[2];
    if (take(&vs, &m[0], a, 0, R, C, "a", 0) < 0 || take(&vs, &m[1], out, 1, C, R, "out", 0) < 0)
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    transpose_tiles(m[1].p, m[1].rs, m[0].p, m[0].rs, R, C);
    Py_END_ALLOW_THREADS
    release(&vs);
    Py_RETURN_NONE;
fail:
    release(&vs);
    return NULL;
}

/* ---------------------------------------------------- softmax cross-entropy */

/* exp(x) in float32 for x <= 88 (the loss calls it with x <= 0): x = n ln 2 + r, |r| <=
 * ln 2 / 2, exp(r) by the degree-7 polynomial of Cephes' expf (its published
 * coefficients), times 2^n made from the exponent bits; about 1 ulp from the true value.
 * Below ln(FLT_MIN) it gives 0 (not the subnormal), NaN gives NaN. Written so that the
 * loop over a row vectorises (libm's expf does not). */
static inline float exp_f(float x)
{
    float t = x < -87.33654475f ? -87.33654475f : x;   /* ln(FLT_MIN): 2^n stays normal */
    t = t > 88.0f ? 88.0f : t;
    float n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    float r = t - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    float y = q * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    y = y * scale;
    return x < -87.33654475f ? 0.0f : y;
}

#define XL 16   /* lanes of the row sums: the loops below vectorise over them */

/* One row of V scores s: p = softmax(s) (max subtracted, exps summed in XL lanes, then the
 * lanes in a fixed order; the last partial block of lanes through a buffer padded with the
 * row's first score, whose exps are dropped, so that it too runs as vectors), *nll = log Σ
 * exp(s - max) - (s[lab] - max), *hit = 1 when lab is the first index of the row's maximum
 * (np.argmax), else 0. */
MULTI(xent_row,
      (const float *restrict s, float *restrict p, Py_ssize_t V,
       int32_t lab, float *nll, float *hit),
      (s, p, V, lab, nll, hit))
{
    float lm[XL], ls[XL], tb[XL], te[XL];
    Py_ssize_t full = V / XL * XL, rest = V - full;
    for (int l = 0; l < XL; l++) {
        lm[l] = s[0];
        ls[l] = 0.0f;
        tb[l] = l < rest ? s[full + l] : s[0];
    }
    for (Py_ssize_t j = 0; j < full; j += XL)
        for (int l = 0; l < XL; l++)
            lm[l] = s[j + l] > lm[l] ? s[j + l] : lm[l];
    for (int l = 0; l < XL; l++)
        lm[l] = tb[l] > lm[l] ? tb[l] : lm[l];
    float m = lm[0];
    for (int l = 1; l < XL; l++)
        m = lm[l] > m ? lm[l] : m;
    for (Py_ssize_t j = 0; j < full; j += XL)
        for (int l = 0; l < XL; l++) {
            float e = exp_f(s[j + l] - m);
            p[j + l] = e;
            ls[l] += e;
        }
    for (int l = 0; l < XL; l++) {
        te[l] = exp_f(tb[l] - m);
        ls[l] += l < rest ? te[l] : 0.0f;
    }
    float sum = ls[0];
    for (int l = 1; l < XL; l++)
        sum += ls[l];
    float inv = 1.0f / sum;
    for (Py_ssize_t j = 0; j < full; j++)
        p[j] *= inv;
    for (Py_ssize_t l = 0; l < rest; l++)
        p[full + l] = te[l] * inv;
    *nll = -((s[lab] - m) - logf(sum));
    int before = 0;             /* a maximum at an index below lab: argmax is not lab */
    if (s[lab] == m)
        for (Py_ssize_t j = 0; j < lab; j++)
            before |= s[j] == m;
    *hit = s[lab] == m && !before ? 1.0f : 0.0f;
}

/* The softmax loss's arguments: a (R, V) array (scores or probabilities) and its labels
 * (R,) int32 in [0, V), then more arrays by take(&l->vs, ...); on an error or at the end,
 * release(&l->vs) releases them all. */
typedef struct {
    views vs;
    const int32_t *lab;
    Py_ssize_t R, V;
} labelled;

static int take_labelled(labelled *l, mat *m, PyObject *a_o, int writable, const char *name,
                         PyObject *lab_o)
{
    l->vs.n = 0;
    if (shape_of(a_o, &l->R, &l->V) < 0)
        return -1;
    if (l->V < 1) {
        PyErr_Format(PyExc_ValueError, "%s: no classes", name);
        return -1;
    }
    Py_ssize_t n;
    if (get_idx(lab_o, slot(&l->vs), l->V, &l->lab, &n) < 0)
        return -1;
    if (n != l->R) {
        PyErr_Format(PyExc_ValueError, "labels: %zd of them for %zd rows", n, l->R);
        return -1;
    }
    return take(&l->vs, m, a_o, writable, l->R, l->V, name, 0);
}

/* softmax_xent(p, s, labels, nll, hit): for each row r of the scores s (R, V): p[r] =
 * softmax(s[r]), nll[r, 0] = -log p[r, labels[r]], hit[r, 0] = 1.0 when labels[r] is the
 * row's argmax (else 0.0); labels int32 in [0, V) */
static PyObject *py_softmax_xent(PyObject *self, PyObject *args)
{
    PyObject *p_o, *s_o, *lab_o, *nll_o, *hit_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &p_o, &s_o, &lab_o, &nll_o, &hit_o))
        return NULL;
    labelled l;
    mat m[4];
    PyObject *ret = NULL;
    if (take_labelled(&l, &m[0], s_o, 0, "s", lab_o) < 0 ||
        take(&l.vs, &m[1], p_o, 1, l.R, l.V, "p", 0) < 0 ||
        take(&l.vs, &m[2], nll_o, 1, l.R, 1, "nll", 0) < 0 ||
        take(&l.vs, &m[3], hit_o, 1, l.R, 1, "hit", 0) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < l.R; r++)
        xent_row(AT(m[0], r), AT(m[1], r), l.V, l.lab[r], AT(m[2], r), AT(m[3], r));
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    release(&l.vs);
    return ret;
}

/* xent_grad(g, p, labels, c): g[r] = (p[r] - onehot(labels[r])) · c[r, 0], each element
 * as NumPy's p.copy(), g[r, labels[r]] -= 1, g *= c computes it (the same roundings) */
MULTI(xent_grad_row,
      (float *restrict g, const float *restrict p, Py_ssize_t V,
       int32_t lab, float c),
      (g, p, V, lab, c))
{
    for (Py_ssize_t j = 0; j < V; j++)
        g[j] = p[j] * c;
    g[lab] = (p[lab] - 1.0f) * c;
}

static PyObject *py_xent_grad(PyObject *self, PyObject *args)
{
    PyObject *g_o, *p_o, *lab_o, *c_o;
    if (!PyArg_ParseTuple(args, "OOOO", &g_o, &p_o, &lab_o, &c_o))
        return NULL;
    labelled l;
    mat m[3];
    PyObject *ret = NULL;
    if (take_labelled(&l, &m[0], p_o, 0, "p", lab_o) < 0 ||
        take(&l.vs, &m[1], g_o, 1, l.R, l.V, "g", 0) < 0 ||
        take(&l.vs, &m[2], c_o, 0, l.R, 1, "c", 0) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < l.R; r++)
        xent_grad_row(AT(m[1], r), AT(m[0], r), l.V, l.lab[r], *AT(m[2], r));
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    release(&l.vs);
    return ret;
}

/* ---------------------------------------------------- the updaters' rules */

/* RMSProp (adagrad 0) and AdaGrad (adagrad 1) on n floats, one pass: the operations of
 * engine/updaters.py in their order and rounding (no fused multiply-adds here, so the
 * result is the NumPy formulas' to the bit), the element-wise clipping first when asked
 * (g = min(max(g, lo), hi), written back to g as np.clip does; NaN stays NaN):
 *   RMSProp  h = h·rho + (g·g)·(1 − rho)     AdaGrad  h = h + g·g
 *   w = w − (g / (sqrt(h) + delta))·lr */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
MULTI(adarule,
      (float *restrict w, float *restrict g, float *restrict h, Py_ssize_t n,
       float lr, float rho, float omr, float delta, int adagrad, int clip,
       float lo, float hi),
      (w, g, h, n, lr, rho, omr, delta, adagrad, clip, lo, hi))
{
    for (Py_ssize_t j = 0; j < n; j++) {
        float gj = g[j];
        if (clip) {
            gj = gj < lo ? lo : gj;
            gj = gj > hi ? hi : gj;
            g[j] = gj;
        }
        float hh = adagrad ? h[j] + gj * gj : h[j] * rho + (gj * gj) * omr;
        h[j] = hh;
        w[j] = w[j] - (gj / (__builtin_sqrtf(hh) + delta)) * lr;
    }
}
#pragma GCC pop_options

/* a contiguous float32 buffer of any shape, as n floats */
static int get_flat(PyObject *o, Py_buffer *view, int writable, float **p, Py_ssize_t *n,
                    const char *name)
{
    if (PyObject_GetBuffer(o, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                           (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format;
    if (f && (f[0] == '<' || f[0] == '=' || f[0] == '@'))
        f++;
    if (view->itemsize != 4 || !f || strcmp(f, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: a contiguous float32 array is needed", name);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    *p = (float *)view->buf;
    *n = view->len / 4;
    return 0;
}

/* the rule splits its floats over threads from this size on (a param of 256 x 256) */
#define ADA_PAR_MIN 65536

typedef struct {
    float *w, *g, *h;
    Py_ssize_t n;
    float lr, rho, omr, delta;
    int adagrad, clip;
    float lo, hi;
} ada_task;

/* thread t's run of the n floats (run16), or all of them with nt = 1 */
static void ada_part(void *p, int t, int nt)
{
    const ada_task *q = p;
    Py_ssize_t a, b;
    run16(q->n, t, nt, &a, &b);
    if (b > a)
        adarule(q->w + a, q->g + a, q->h + a, b - a, q->lr, q->rho, q->omr, q->delta, q->adagrad,
                q->clip, q->lo, q->hi);
}

/* adarule(w, g, h, lr, rho, one_minus_rho, delta, adagrad, clip, lo, hi, threads): see
 * adarule; a param of ADA_PAR_MIN floats or more is split over that many threads of the
 * step GEMM's pool (element-wise: the same bits) */
static PyObject *py_adarule(PyObject *self, PyObject *args)
{
    PyObject *wo, *go, *ho;
    float lr, rho, omr, delta, lo, hi;
    int adagrad, clip, threads = 1;
    if (!PyArg_ParseTuple(args, "OOOffffppff|i", &wo, &go, &ho, &lr, &rho, &omr, &delta,
                          &adagrad, &clip, &lo, &hi, &threads))
        return NULL;
    views vs = {.n = 0};
    float *w, *g, *h;
    Py_ssize_t nw, ng, nh;
    PyObject *ret = NULL;
    if (get_flat(wo, slot(&vs), 1, &w, &nw, "w") < 0 ||
        get_flat(go, slot(&vs), 1, &g, &ng, "g") < 0 ||
        get_flat(ho, slot(&vs), 1, &h, &nh, "h") < 0)
        goto done;
    if (ng != nw || nh != nw) {
        PyErr_SetString(PyExc_ValueError, "w, g and h must have the same size");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ada_task q = {w, g, h, nw, lr, rho, omr, delta, adagrad, clip, lo, hi};
    if (threads > 1 && nw >= ADA_PAR_MIN)
        sg_parallel(ada_part, &q, threads);
    else
        ada_part(&q, 0, 1);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    release(&vs);
    return ret;
}

static int get_2d(PyObject *o, Py_buffer *view, int writable, float **p, Py_ssize_t shape[2],
                  Py_ssize_t strides[2], const char *name);

/* ------------------------------------- step-major <-> feature-major layouts */

/* The arguments of unstep and restep: a (T, R, B) block of steps (C-contiguous) and a
 * (R, T·B) block flat (contiguous rows), each writable or not; -1 with a ValueError
 * naming ``what`` when they do not fit. */
static int steps_and_flat(PyObject *steps_o, int steps_w, PyObject *flat_o, int flat_w,
                          Py_ssize_t T, views *vs, float **steps, float **flat,
                          Py_ssize_t shape[2], Py_ssize_t strides[2], const char *what)
{
    Py_ssize_t n;
    if (get_2d(flat_o, slot(vs), flat_w, flat, shape, strides, "flat") < 0 ||
        get_flat(steps_o, slot(vs), steps_w, steps, &n, "steps") < 0)
        return -1;
    if (T <= 0 || shape[1] % T != 0 || n != shape[0] * shape[1] ||
        (shape[1] > 1 && strides[1] != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: flat (R, T*B) with contiguous rows and steps of "
                     "R*T*B floats are needed", what);   /* the format must be ASCII */
        return -1;
    }
    return 0;
}


typedef struct {
    float *flat;
    Py_ssize_t frs;
    const float *steps;
    Py_ssize_t T, R, B;
} unstep_task;

static void unstep_part(void *p, int t, int nt)
{
    const unstep_task *q = p;
    Py_ssize_t r0 = q->R * t / nt, r1 = q->R * (t + 1) / nt;
    for (Py_ssize_t s = 0; s < q->T; s++) {
        const float *src = q->steps + (s * q->R + r0) * q->B;
        for (Py_ssize_t r = r0; r < r1; r++, src += q->B)
            memcpy(q->flat + r * q->frs + s * q->B, src, (size_t)q->B * sizeof(float));
    }
}

/* unstep(flat, steps): flat (R, T·B) = steps (T, R, B) laid out feature-major (step s in
 * columns s·B..s·B+B-1); steps C-contiguous, flat with contiguous rows; rows split over
 * the kernels' threads */
static PyObject *py_unstep(PyObject *self, PyObject *args)
{
    PyObject *flat_o, *steps_o;
    Py_ssize_t T;
    if (!PyArg_ParseTuple(args, "OOn", &flat_o, &steps_o, &T))
        return NULL;
    views vs = {.n = 0};
    float *flat, *steps;
    Py_ssize_t shape[2], strides[2];
    PyObject *ret = NULL;
    if (steps_and_flat(steps_o, 0, flat_o, 1, T, &vs, &steps, &flat, shape, strides,
                       "unstep") == 0) {
        unstep_task q = {flat, strides[0], steps, T, shape[0], shape[1] / T};
        over_rows(unstep_part, &q, shape[0] * shape[1]);
        ret = Py_None;
        Py_INCREF(ret);
    }
    release(&vs);
    return ret;
}

/* ------------------------------------------------ feature-major to step-major */

typedef struct {
    float *steps;
    const float *flat, *bias;
    Py_ssize_t frs, T, R, B;
} restep_task;

static void restep_part(void *p, int t, int nt)
{
    const restep_task *q = p;
    Py_ssize_t r0 = q->R * t / nt, r1 = q->R * (t + 1) / nt;
    for (Py_ssize_t s = 0; s < q->T; s++) {
        float *dst = q->steps + (s * q->R + r0) * q->B;
        for (Py_ssize_t r = r0; r < r1; r++, dst += q->B) {
            const float *src = q->flat + r * q->frs + s * q->B;
            float b = q->bias ? q->bias[r] : 0.0f;
            for (Py_ssize_t j = 0; j < q->B; j++)
                dst[j] = src[j] + b;
        }
    }
}

/* restep(steps, flat, bias, T): steps (T, R, B)[s][r][j] = flat[r][s·B + j] + bias[r] (bias
 * None: + 0), in one pass, the rows split over the kernels' threads; steps C-contiguous,
 * flat with contiguous rows, bias (R,) contiguous */
static PyObject *py_restep(PyObject *self, PyObject *args)
{
    PyObject *steps_o, *flat_o, *bias_o;
    Py_ssize_t T;
    if (!PyArg_ParseTuple(args, "OOOn", &steps_o, &flat_o, &bias_o, &T))
        return NULL;
    views vs = {.n = 0};
    float *flat, *steps, *bias = NULL;
    Py_ssize_t shape[2], strides[2], nb = 0;
    PyObject *ret = NULL;
    if (steps_and_flat(steps_o, 1, flat_o, 0, T, &vs, &steps, &flat, shape, strides,
                       "restep") < 0 ||
        (bias_o != Py_None && get_flat(bias_o, slot(&vs), 0, &bias, &nb, "bias") < 0))
        goto done;
    if (bias && nb != shape[0]) {
        PyErr_SetString(PyExc_ValueError, "restep: a bias of R floats (flat's rows) is needed");
        goto done;
    }
    restep_task q = {steps, flat, bias, strides[0], T, shape[0], shape[1] / T};
    over_rows(restep_part, &q, shape[0] * shape[1]);
    ret = Py_None;
    Py_INCREF(ret);
done:
    release(&vs);
    return ret;
}

/* ------------------------------------------- the step GEMM (stepgemm.c) */

/* a 2-D float32 buffer with strides in whole floats */
static int get_2d(PyObject *o, Py_buffer *view, int writable, float **p, Py_ssize_t shape[2],
                  Py_ssize_t strides[2], const char *name)
{
    if (PyObject_GetBuffer(o, view, PyBUF_RECORDS_RO | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format;
    if (f && (f[0] == '<' || f[0] == '=' || f[0] == '@'))
        f++;
    if (view->ndim != 2 || view->itemsize != 4 || !f || strcmp(f, "f") != 0 ||
        view->strides[0] % 4 != 0 || view->strides[1] % 4 != 0) {
        PyErr_Format(PyExc_TypeError, "%s: a 2-D float32 array is needed", name);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    *p = (float *)view->buf;
    for (int k = 0; k < 2; k++) {
        shape[k] = view->shape[k];
        strides[k] = view->strides[k] / 4;
    }
    return 0;
}

/* step_pack(dst, a, threads, more=None): dst (flat, step_packed_size(M, K) floats) = a
 * (M, K) packed; with more (M, K2), [a more] (M, K + K2) packed */
static PyObject *py_step_pack(PyObject *self, PyObject *args)
{
    PyObject *dst_o, *a_o, *more_o = Py_None;
    int threads;
    if (!PyArg_ParseTuple(args, "OOi|O", &dst_o, &a_o, &threads, &more_o))
        return NULL;
    Py_buffer vd = {.obj = NULL}, va = {.obj = NULL}, vm = {.obj = NULL};
    float *d, *a, *m = NULL;
    Py_ssize_t nd, shape[2], strides[2], mshape[2] = {0, 0}, mstrides[2] = {0, 0};
    PyObject *ret = NULL;
    if (get_flat(dst_o, &vd, 1, &d, &nd, "dst") < 0 || get_2d(a_o, &va, 0, &a, shape, strides, "a") < 0)
        goto done;
    if (more_o != Py_None) {
        if (get_2d(more_o, &vm, 0, &m, mshape, mstrides, "more") < 0)
            goto done;
        if (mshape[0] != shape[0]) {
            PyErr_Format(PyExc_ValueError, "a has %zd rows, more %zd", shape[0], mshape[0]);
            goto done;
        }
    }
    Py_ssize_t K = shape[1] + mshape[1];
    if ((size_t)nd != sg_packed_size(shape[0], K)) {
        PyErr_Format(PyExc_ValueError, "dst: %zd floats, a (%zd, %zd) packs into %zu", nd,
                     shape[0], K, sg_packed_size(shape[0], K));
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    sg_pack_at(d, a, strides[0], strides[1], shape[0], shape[1], K, 0, threads);
    if (m && mshape[1] > 0)
        sg_pack_at(d, m, mstrides[0], mstrides[1], shape[0], mshape[1], K, shape[1], threads);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (vd.obj)
        PyBuffer_Release(&vd);
    if (va.obj)
        PyBuffer_Release(&va);
    if (vm.obj)
        PyBuffer_Release(&vm);
    return ret;
}

/* isa: 2 (AVX2) or 3 (AVX-512), at most the CPU's (or, none_ok, 0: plain C) */
static int check_isa(int isa, int none_ok)
{
    if (!(isa == SG_ISA_AVX2 || isa == SG_ISA_AVX512 || (none_ok && isa == SG_ISA_NONE))) {
        PyErr_Format(PyExc_ValueError, "isa %d: 2 (AVX2) or 3 (AVX-512)%s", isa,
                     none_ok ? " or 0 (none)" : "");
        return -1;
    }
    if (isa > sg_cpu_isa()) {
        PyErr_Format(PyExc_ValueError, "isa %d: this CPU gives at most %d", isa, sg_cpu_isa());
        return -1;
    }
    return 0;
}

/* A one-hot projection's table (V, R) with contiguous rows and its indices (n,) into V,
 * for sg_gemm and sg_scatter_t */
static int get_onehot(PyObject *tab_o, Py_buffer *vt, PyObject *idx_o, Py_buffer *vi, int writable,
                      Py_ssize_t R, Py_ssize_t n, sg_onehot *oh)
{
    float *t;
    Py_ssize_t ts[2], tst[2], ni;
    const int32_t *idx;
    if (get_2d(tab_o, vt, writable, &t, ts, tst, "table") < 0)
        return -1;
    if (ts[1] != R || (R > 1 && tst[1] != 1)) {
        PyErr_Format(PyExc_ValueError, "table (%zd, %zd): rows of %zd contiguous floats are "
                     "needed", ts[0], ts[1], R);
        return -1;
    }
    if (get_idx(idx_o, vi, ts[0], &idx, &ni) < 0)
        return -1;
    if (ni != n) {
        PyErr_Format(PyExc_ValueError, "idx has %zd entries for %zd columns", ni, n);
        return -1;
    }
    *oh = (sg_onehot){.table = t, .trs = tst[0], .idx = idx, .scatter = writable};
    return 0;
}

/* step_gemm(c, packed, b, accumulate, isa, threads[, table, idx, scatter, keep, add, keep2,
 * side]): c (M, N) (+)= A b, A (M, K) packed, b (K, N); c and b with contiguous rows. With a
 * table (sg_onehot): gather, c[i][j] gets + table[idx[j]][i], table (V, M); scatter,
 * table[idx[j]][k] += b[k][j], table (V, K), or += side[k][j] given a side block. keep: b
 * copied there too; keep2: the side block copied there. add: c = add + A b (c's shape).
 * keep, keep2 and side have b's shape; all contiguous rows. */
static PyObject *py_step_gemm(PyObject *self, PyObject *args)
{
    PyObject *c_o, *pa_o, *b_o, *tab_o = Py_None, *idx_o = Py_None, *keep_o = Py_None,
             *add_o = Py_None, *keep2_o = Py_None, *side_o = Py_None, *more_o = Py_None;
    int accumulate, isa, threads, scatter = 0;
    if (!PyArg_ParseTuple(args, "OOOpii|OOpOOOOO", &c_o, &pa_o, &b_o, &accumulate, &isa,
                          &threads, &tab_o, &idx_o, &scatter, &keep_o, &add_o, &keep2_o,
                          &side_o, &more_o))
        return NULL;
    views vs = {.n = 0};
    float *c, *pa, *b;
    Py_ssize_t np_, cs[2], cst[2], bs[2], bst[2], km = 0, mn = 0;
    sg_onehot oh, *ohp = NULL;
    mat keep, add, keep2, side, more = {NULL, 0};
    PyObject *ret = NULL;
    if (get_2d(c_o, slot(&vs), 1, &c, cs, cst, "c") < 0 ||
        get_flat(pa_o, slot(&vs), 0, &pa, &np_, "packed") < 0 ||
        get_2d(b_o, slot(&vs), 0, &b, bs, bst, "b") < 0)
        goto done;
    if (check_isa(isa, 0) < 0)
        goto done;
    if (tab_o != Py_None) {
        Py_buffer *vt = slot(&vs), *vi = slot(&vs);
        if (get_onehot(tab_o, vt, idx_o, vi, scatter, scatter ? bs[0] : cs[0], cs[1], &oh) < 0)
            goto done;
        if (!scatter && accumulate) {
            PyErr_SetString(PyExc_ValueError, "a gathered table is added to a product, not "
                            "to an accumulated one");
            goto done;
        }
        ohp = &oh;
    }
    if (add_o != Py_None && accumulate) {
        PyErr_SetString(PyExc_ValueError, "add: a product added to a matrix is not also "
                        "accumulated");
        goto done;
    }
    if (keep2_o != Py_None && side_o == Py_None) {
        PyErr_SetString(PyExc_ValueError, "keep2 copies a side block: none given");
        goto done;
    }
    if (side_o != Py_None && keep2_o == Py_None && !(ohp && scatter)) {
        PyErr_SetString(PyExc_ValueError, "a side block with neither a scatter nor keep2");
        goto done;
    }
    /* add has c's shape, the others b's, each with contiguous rows */
    if (take(&vs, &add, add_o, 0, cs[0], cs[1], "add", 1) < 0 ||
        take(&vs, &keep, keep_o, 1, bs[0], bs[1], "keep", 1) < 0 ||
        take(&vs, &keep2, keep2_o, 1, bs[0], bs[1], "keep2", 1) < 0 ||
        take(&vs, &side, side_o, 0, bs[0], bs[1], "side", 1) < 0)
        goto done;
    /* more: B's rows after b's, (K2, N) with contiguous rows */
    if (more_o != Py_None && (shape_of(more_o, &km, &mn) < 0 ||
                              take(&vs, &more, more_o, 0, km, bs[1], "more", 0) < 0))
        goto done;
    if (bs[1] != cs[1] || (size_t)np_ != sg_packed_size(cs[0], bs[0] + km)) {
        PyErr_Format(PyExc_ValueError, "c (%zd, %zd), b (%zd, %zd), more of %zd rows and %zd "
                     "packed floats do not fit", cs[0], cs[1], bs[0], bs[1], km, np_);
        goto done;
    }
    if ((cs[1] > 1 && cst[1] != 1) || (bs[1] > 1 && bst[1] != 1)) {
        PyErr_SetString(PyExc_ValueError, "c and b must have contiguous rows");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    sg_extras x = {.oh = ohp, .keep = keep.p, .krs = keep.rs, .addend = add.p, .ars = add.rs,
                   .side = side.p, .sdrs = side.rs, .keep2 = keep2.p, .k2rs = keep2.rs,
                   .more = more.p, .mrs = more.rs, .kmore = km};
    rc = sg_gemm(pa, cs[0], bs[0] + km, b, bst[0], cs[1], c, cst[0], accumulate, &x, isa,
                 threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    release(&vs);
    return ret;
}

/* scatter_t(acc, d, idx, isa): acc[idx[j]][r] += d[r][j], acc (V, R) and d (R, n) with
 * contiguous rows, the rows split over the kernels' threads */
static PyObject *py_scatter_t(PyObject *self, PyObject *args)
{
    PyObject *acc_o, *d_o, *idx_o;
    int isa;
    if (!PyArg_ParseTuple(args, "OOOi", &acc_o, &d_o, &idx_o, &isa))
        return NULL;
    views vs = {.n = 0};
    Py_ssize_t R, n;
    mat d;
    sg_onehot oh;
    PyObject *ret = NULL;
    if (check_isa(isa, 1) < 0 || shape_of(d_o, &R, &n) < 0 ||
        take(&vs, &d, d_o, 0, R, n, "d", 0) < 0)
        goto done;
    Py_buffer *vt = slot(&vs), *vi = slot(&vs);
    if (get_onehot(acc_o, vt, idx_o, vi, 1, R, n, &oh) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    sg_scatter_t(oh.table, oh.trs, d.p, d.rs, R, oh.idx, n, isa, g_threads);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    release(&vs);
    return ret;
}

static PyObject *py_step_packed_size(PyObject *self, PyObject *args)
{
    Py_ssize_t M, K;
    if (!PyArg_ParseTuple(args, "nn", &M, &K))
        return NULL;
    return PyLong_FromSize_t(sg_packed_size(M, K));
}

/* kernel_threads(n): the threads the cell kernels may use from now on */
static PyObject *py_kernel_threads(PyObject *self, PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n))
        return NULL;
    g_threads = n < 1 ? 1 : n > SG_MAXT ? SG_MAXT : n;
    Py_RETURN_NONE;
}

static PyObject *py_park(PyObject *self, PyObject *noargs)
{
    sg_park();
    Py_RETURN_NONE;
}

static PyObject *py_step_moves(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(sg_moves());
}

/* round_trip_ns(cpu_a, cpu_b, rounds): see sg_round_trip_ns; the GIL released */
static PyObject *py_round_trip_ns(PyObject *self, PyObject *args)
{
    int a, b, rounds;
    if (!PyArg_ParseTuple(args, "iii", &a, &b, &rounds))
        return NULL;
    if (a < 0 || b < 0 || a == b || rounds < 1) {
        PyErr_Format(PyExc_ValueError, "round_trip_ns(%d, %d, %d): two different cores and "
                     "at least one round", a, b, rounds);
        return NULL;
    }
    double ns;
    Py_BEGIN_ALLOW_THREADS
    ns = sg_round_trip_ns(a, b, rounds);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(ns);
}

static PyObject *py_step_isa(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(sg_cpu_isa());
}

/* step_quiet(address): the function (void (*)(void)) the pool calls before its threads
 * start work, 0 for none */
static PyObject *py_step_quiet(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    if (!PyArg_ParseTuple(args, "K", &addr))
        return NULL;
    sg_set_quiet((void (*)(void))(uintptr_t)addr);
    Py_RETURN_NONE;
}

/* cell_isa(level): the loops' instruction set (see MULTI) lowered or raised to ``level``
 * (1 baseline, 2 AVX2, 3 AVX-512; at most the CPU's, else ValueError); -1 leaves it.
 * Returns the level in use. */
static PyObject *py_cell_isa(PyObject *self, PyObject *args)
{
    int level;
    if (!PyArg_ParseTuple(args, "i", &level))
        return NULL;
    if (level != -1) {
        if (level < 1 || level > 3) {
            PyErr_Format(PyExc_ValueError, "level %d: 1 (baseline), 2 (AVX2) or 3 (AVX-512)",
                         level);
            return NULL;
        }
        if (level > cpu_level) {
            PyErr_Format(PyExc_ValueError, "level %d: this CPU (or build) gives at most %d",
                         level, cpu_level);
            return NULL;
        }
        cell_isa = level;
    }
    return PyLong_FromLong(cell_isa);
}

static PyObject *py_info(PyObject *self, PyObject *noargs)
{
    static const char *const names[] = {"", "baseline x86-64", "AVX2", "AVX-512"};
    const char *isa = HAVE_MULTI ? names[cell_isa] : "compiler default";
    const char *cpu = HAVE_MULTI ? names[cpu_level] : "compiler default";
    return Py_BuildValue("{s:s,s:i,s:s,s:i}", "isa", isa, "level", cell_isa, "cpu_isa", cpu,
                         "cpu_level", cpu_level);
}

static PyMethodDef methods[] = {
    {"softmax_xent", py_softmax_xent, METH_VARARGS,
     "softmax_xent(p, s, labels, nll, hit): softmax, its cross-entropy and argmax hit by row"},
    {"xent_grad", py_xent_grad, METH_VARARGS,
     "xent_grad(g, p, labels, c): g = (p - onehot(labels)) * c, by row"},
    {"rnn_forward", py_rnn_forward, METH_VARARGS, "rnn_forward(pre, relu): h' = act(pre) in pre"},
    {"rnn_backward", py_rnn_backward, METH_VARARGS,
     "rnn_backward(dh, h, out, relu): out = dh (1 - h²), or dh [h > 0]"},
    {"gru_forward", py_gru_forward, METH_VARARGS,
     "gru_forward(xproj, hproj, h, h_new, c): the GRU step; z, r into hproj[:2H]"},
    {"gru_backward", py_gru_backward, METH_VARARGS,
     "gru_backward(dh, h, zr, c, hc, dxproj, dhproj, direct)"},
    {"lstm_forward", py_lstm_forward, METH_VARARGS,
     "lstm_forward(pre, c, h_new, c_new, tc): the LSTM step; the gates into pre"},
    {"lstm_backward", py_lstm_backward, METH_VARARGS,
     "lstm_backward(dh, dc or None, c, ifo, g, tc, dpre, dc_prev)"},
    {"gather", py_gather, METH_VARARGS,
     "gather(out, table, idx, add): out (+)= table[:, idx] (idx int32)"},
    {"transpose", py_transpose, METH_VARARGS, "transpose(out, a): out = a.T (float32)"},
    {"adarule", py_adarule, METH_VARARGS,
     "adarule(w, g, h, lr, rho, 1 - rho, delta, adagrad, clip, lo, hi): RMSProp / AdaGrad"},
    {"tanh", py_tanh, METH_VARARGS, "tanh(a): the kernels' tanh, in place"},
    {"step_pack", py_step_pack, METH_VARARGS,
     "step_pack(dst, a, threads[, more]): a (M, K) float32 (or [a more]) packed into dst "
     "(step_packed_size floats)"},
    {"step_gemm", py_step_gemm, METH_VARARGS,
     "step_gemm(c, packed, b, accumulate, isa, threads[, table, idx, scatter, keep, add, "
     "keep2, side, more]): "
     "c (+)= A b, A packed by step_pack, with what rides along (see the function's comment)"},
    {"step_packed_size", py_step_packed_size, METH_VARARGS,
     "step_packed_size(M, K): floats of a packed (M, K) operand"},
    {"kernel_threads", py_kernel_threads, METH_VARARGS,
     "kernel_threads(n): the threads the cell kernels split their rows over"},
    {"unstep", py_unstep, METH_VARARGS,
     "unstep(flat, steps, T): flat (R, T*B) = steps (T, R, B), step t in columns t*B.."},
    {"restep", py_restep, METH_VARARGS,
     "restep(steps, flat, bias, T): steps (T, R, B) = flat (R, T*B) + bias (R,) step-major"},
    {"park", py_park, METH_NOARGS,
     "park(): the pool's threads sleep now instead of spinning for the next task"},
    {"step_moves", py_step_moves, METH_NOARGS,
     "step_moves(): how many times a caller moved a pool worker off its own core"},
    {"round_trip_ns", py_round_trip_ns, METH_VARARGS,
     "round_trip_ns(cpu_a, cpu_b, rounds): ns per round trip of a cache line between the "
     "two cores (-1: one of them cannot be had)"},
    {"cell_isa", py_cell_isa, METH_VARARGS,
     "cell_isa(level): the cell loops' instruction set, 1 baseline, 2 AVX2, 3 AVX-512 (-1: "
     "unchanged); returns the one in use"},
    {"step_isa", py_step_isa, METH_NOARGS, "step_isa(): 3 AVX-512, 2 AVX2 (+FMA), 0 neither"},
    {"scatter_t", py_scatter_t, METH_VARARGS,
     "scatter_t(acc, d, idx, isa): acc[idx[j], r] += d[r, j] (acc (V, R), idx int32)"},
    {"step_quiet", py_step_quiet, METH_VARARGS,
     "step_quiet(address): void (*)(void) called before the step GEMM's threads start work"},
    {"info", py_info, METH_NOARGS, "info(): {'isa': the instruction set the loops run with, 'level': its number, "
     "'cpu_isa', 'cpu_level': the CPU's best}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Fused float32 cell kernels (see native.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    cell_isa = cpu_level = cpu_isa();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", KERNELS_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
