/* CPython binding of the head kernel: edge_quq._headkernel.
 *
 * Plain C API and the buffer protocol, so the build needs no numpy headers. The Python side
 * (edge_quq/samplers/native.py) passes C-contiguous numpy arrays of the right dtype; sizes are checked here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "frame.h"
#include "headkernel.h"
#include "pybuf.h"
#include "rowdot.h"
#include "whitener.h"

/* Borrow obj's C-contiguous buffer with `flags` on top: 1 when held, 0 for None if `optional`, -1 on error. */
static int buf_open(PyObject *obj, buf_t *b, int flags, int optional, const char *name) {
    b->held = 0;
    if (obj == NULL || obj == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_TypeError, "%s is required", name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | flags) < 0) return -1;
    b->held = 1;
    return 1;
}

/* Borrow a C-contiguous buffer of exactly `count` items of `itemsize` bytes; obj may be None if `optional`. */
static int buf_get(PyObject *obj, buf_t *b, Py_ssize_t count, Py_ssize_t itemsize, int writable, int optional,
                   const char *name) {
    const int rc = buf_open(obj, b, writable ? PyBUF_WRITABLE : 0, optional, name);
    if (rc <= 0) return rc;
    if (b->view.len != count * itemsize || (b->view.itemsize != itemsize && b->view.itemsize != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes (itemsize %zd)", name,
                     count, itemsize, b->view.len, b->view.itemsize);
        buf_release(b);
        return -1;
    }
    return 0;
}

static const eq_kernels_t *kernels_by_name(PyObject *isa) {
    if (isa == NULL || isa == Py_None) return eq_kernels_get(0);
    const char *name = PyUnicode_AsUTF8(isa);
    if (!name) return NULL;
    const eq_kernels_t *k = eq_kernels_find(name);
    if (!k) PyErr_Format(PyExc_ValueError, "kernel variant %R is not available on this CPU", isa);
    return k;
}

/* The head's buffers and the three outputs every entry writes (mean, std, eval logits), checked and borrowed. */
typedef struct {
    buf_t x, b0, b1, w0, w1, mean, std, logits;
    eq_head_t head;
} head_bufs_t;

static void head_bufs_release(head_bufs_t *hb) {
    buf_release(&hb->x); buf_release(&hb->b0); buf_release(&hb->b1); buf_release(&hb->w0); buf_release(&hb->w1);
    buf_release(&hb->mean); buf_release(&hb->std); buf_release(&hb->logits);
}

/* Returns 0, or -1 with a Python error set (release with head_bufs_release either way). Shapes come from the
 * vectors: F from x, H from b0, C from b1; the matrices and outputs must match them. */
static int head_bufs_get(head_bufs_t *hb, PyObject *ox, PyObject *ow0, PyObject *ob0, PyObject *ow1, PyObject *ob1,
                         PyObject *omean, PyObject *ostd, PyObject *ologits, double p0, double p1, int act) {
    memset(hb, 0, sizeof *hb);
    if (!(p0 >= 0.0 && p0 < 1.0 && p1 >= 0.0 && p1 < 1.0)) {
        PyErr_Format(PyExc_ValueError, "dropout rates must be in [0, 1), got %g and %g", p0, p1);
        return -1;
    }
    if (act != EQ_ACT_LINEAR && act != EQ_ACT_SIGMOID && act != EQ_ACT_SOFTMAX) {
        PyErr_Format(PyExc_ValueError, "unknown activation code %d", act);
        return -1;
    }
    PyObject *vecs[3] = {ox, ob0, ob1};
    buf_t *vbufs[3] = {&hb->x, &hb->b0, &hb->b1};
    for (int i = 0; i < 3; ++i) {
        if (PyObject_GetBuffer(vecs[i], &vbufs[i]->view, PyBUF_C_CONTIGUOUS) < 0) return -1;
        vbufs[i]->held = 1;
    }
    const Py_ssize_t F = hb->x.view.len / 4, H = hb->b0.view.len / 4, C = hb->b1.view.len / 4;
    if (F < 1 || H < 1 || C < 1 || F > INT_MAX / 2 || H > INT_MAX / 2 || C > INT_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "empty or oversized head");
        return -1;
    }
    if (buf_get(ow0, &hb->w0, F * H, 4, 0, 0, "w0") || buf_get(ow1, &hb->w1, H * C, 4, 0, 0, "w1") ||
        buf_get(omean, &hb->mean, C, 8, 1, 0, "mean_out") || buf_get(ostd, &hb->std, C, 8, 1, 0, "std_out") ||
        buf_get(ologits, &hb->logits, C, 4, 1, 0, "logits_out"))
        return -1;
    eq_head_t head = {(int)F, (int)H, (int)C, (const float *)hb->x.view.buf, (const float *)hb->w0.view.buf,
                      (const float *)hb->b0.view.buf, (const float *)hb->w1.view.buf, (const float *)hb->b1.view.buf,
                      p0, p1, act};
    hb->head = head;
    return 0;
}

static PyObject *run(PyObject *args, PyObject *kwargs, int given) {
    static char *kwlist[] = {"x", "w0", "b0", "w1", "b1", "p0", "p1", "activation", "num_iter", "mean_out",
                             "std_out", "logits_out", "seed", "mask0", "mask1", "probs_out", "isa", "stats_out",
                             "w0q", "w0s", NULL};
    PyObject *ox, *ow0, *ob0, *ow1, *ob1, *omean, *ostd, *ologits;
    PyObject *omask0 = Py_None, *omask1 = Py_None, *oprobs = Py_None, *oisa = Py_None, *ostats = Py_None;
    PyObject *ow0q = Py_None, *ow0s = Py_None;
    double p0, p1;
    int act, T;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOddiiOOO|$KOOOOOOO", kwlist, &ox, &ow0, &ob0, &ow1, &ob1, &p0,
                                     &p1, &act, &T, &omean, &ostd, &ologits, &seed, &omask0, &omask1, &oprobs, &oisa,
                                     &ostats, &ow0q, &ow0s))
        return NULL;
    if (T < 1) return PyErr_Format(PyExc_ValueError, "num_iter must be >= 1, got %d", T);
    const eq_kernels_t *k = kernels_by_name(oisa);
    if (!k) return NULL;

    head_bufs_t hb;
    buf_t bp = {0}, bk0 = {0}, bk1 = {0}, bst = {0}, bq = {0}, bs = {0};
    PyObject *result = NULL;
    if (head_bufs_get(&hb, ox, ow0, ob0, ow1, ob1, omean, ostd, ologits, p0, p1, act) ||
        buf_get(oprobs, &bp, (Py_ssize_t)T * hb.head.C, 4, 1, 1, "probs_out") ||
        buf_get(omask0, &bk0, (Py_ssize_t)T * hb.head.F, 1, 0, 1, "mask0") ||
        buf_get(omask1, &bk1, (Py_ssize_t)T * hb.head.H, 1, 0, 1, "mask1") ||
        buf_get(ostats, &bst, 1, 8, 1, 1, "stats_out") ||
        buf_get(ow0q, &bq, (Py_ssize_t)hb.head.F * (Py_ssize_t)eq_w0q_stride(hb.head.H), 1, 0, 1, "w0q") ||
        buf_get(ow0s, &bs, hb.head.H, 4, 0, 1, "w0s"))
        goto done;
    if (bq.held != bs.held) {
        PyErr_SetString(PyExc_ValueError, "w0q and w0s go together (from quantize_w0)");
        goto done;
    }
    hb.head.w0q = bq.held ? (const int8_t *)bq.view.buf : NULL;
    hb.head.w0s = bs.held ? (const float *)bs.view.buf : NULL;
    eq_moments_t out = {(double *)hb.mean.view.buf, (double *)hb.std.view.buf, (float *)hb.logits.view.buf,
                        bp.held ? (float *)bp.view.buf : NULL, 0.0, 0};
    const uint8_t *k0 = bk0.held ? (const uint8_t *)bk0.view.buf : NULL;
    const uint8_t *k1 = bk1.held ? (const uint8_t *)bk1.view.buf : NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = eq_head_moments(&hb.head, k, T, (uint64_t)seed, given, k0, k1, &out);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (bst.held) *(int64_t *)bst.view.buf = (int64_t)out.macs;
    result = PyFloat_FromDouble(out.expected_entropy);
done:
    head_bufs_release(&hb);
    buf_release(&bp); buf_release(&bk0); buf_release(&bk1); buf_release(&bst); buf_release(&bq); buf_release(&bs);
    return result;
}

static PyObject *py_moments(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return run(args, kwargs, 0);
}

static PyObject *py_moments_with_masks(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return run(args, kwargs, 1);
}

static PyObject *py_analytic(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *ow0, *ob0, *ow1, *ob1, *omean, *ostd, *ologits;
    double p0, p1, temperature;
    int act;
    if (!PyArg_ParseTuple(args, "OOOOOddidOOO", &ox, &ow0, &ob0, &ow1, &ob1, &p0, &p1, &act, &temperature, &omean,
                          &ostd, &ologits))
        return NULL;
    if (!(temperature > 0.0)) return PyErr_Format(PyExc_ValueError, "temperature must be > 0, got %g", temperature);
    head_bufs_t hb;
    PyObject *result = NULL;
    if (head_bufs_get(&hb, ox, ow0, ob0, ow1, ob1, omean, ostd, ologits, p0, p1, act)) goto done;
    eq_moments_t out = {(double *)hb.mean.view.buf, (double *)hb.std.view.buf, (float *)hb.logits.view.buf, NULL,
                        0.0, 0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = eq_head_analytic(&hb.head, temperature, &out);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyFloat_FromDouble(out.expected_entropy);
done:
    head_bufs_release(&hb);
    return result;
}

static PyObject *py_quantize_w0(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ow0, *oq, *os;
    int H;
    if (!PyArg_ParseTuple(args, "OiOO", &ow0, &H, &oq, &os)) return NULL;
    if (H < 1) return PyErr_Format(PyExc_ValueError, "H must be >= 1, got %d", H);
    buf_t bw = {0}, bq = {0}, bs = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(ow0, &bw.view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    bw.held = 1;
    const Py_ssize_t F = bw.view.len / 4 / H;
    if (F < 1 || F * H * 4 != bw.view.len || F > INT_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "w0 must hold F * H float32");
        goto done;
    }
    if (buf_get(oq, &bq, F * (Py_ssize_t)eq_w0q_stride(H), 1, 1, 0, "w0q_out") || buf_get(os, &bs, H, 4, 1, 0, "w0s_out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    eq_quantize_w0((int)F, H, (const float *)bw.view.buf, (int8_t *)bq.view.buf, (float *)bs.view.buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    buf_release(&bw); buf_release(&bq); buf_release(&bs);
    return result;
}

static PyObject *py_w0q_stride(PyObject *self, PyObject *args) {
    (void)self;
    int H;
    if (!PyArg_ParseTuple(args, "i", &H)) return NULL;
    return PyLong_FromSize_t(eq_w0q_stride(H));
}

static PyObject *py_is_int8(PyObject *self, PyObject *isa) {
    (void)self;
    const eq_kernels_t *k = kernels_by_name(isa);
    if (!k) return NULL;
    return PyBool_FromLong(k->gemm_i8 != NULL);
}

static PyObject *py_isa(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyUnicode_FromString(eq_kernels_get(0)->name);
}

static PyObject *py_isas(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    const int n = eq_kernels_count();
    PyObject *t = PyTuple_New(n);
    if (!t) return NULL;
    for (int i = 0; i < n; ++i) {
        PyObject *s = PyUnicode_FromString(eq_kernels_get(i)->name);
        if (!s) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

static PyObject *py_cpu_features(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyUnicode_FromString(eq_cpu_features());
}

static PyObject *py_bernoulli_bits(PyObject *self, PyObject *args) {
    /* Test hook: n words of 64-lane drop bits for rate p from a seeded generator. */
    (void)self;
    double p;
    unsigned long long seed;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "dKn", &p, &seed, &n)) return NULL;
    if (n < 0 || !(p >= 0.0 && p < 1.0)) return PyErr_Format(PyExc_ValueError, "bad arguments");
    PyObject *b = PyBytes_FromStringAndSize(NULL, n * 8);
    if (!b) return NULL;
    uint64_t *w = (uint64_t *)PyBytes_AS_STRING(b);
    eq_rng_t r;
    eq_rng_seed(&r, seed);
    const uint32_t thr = eq_rate_threshold(p);
    for (Py_ssize_t i = 0; i < n; ++i) w[i] = eq_bernoulli64(&r, thr, ~0ULL);
    return b;
}

/* -- the per-frame fast paths (frame.c). Their arrays come from callers, so besides sizes the item types are
 * checked too (struct format codes). Each kernel is batched over rows; the moment scores and the decision, with
 * their row outputs left out, run one row and return Python numbers instead, what a frame needs. */

static PyObject *py_none(void) {
    Py_INCREF(Py_None);
    return Py_None;
}

/* The struct format character of an open buffer's items ('q' for any 8-byte 'l'). */
static char buf_format(const buf_t *b) {
    const char *f = b->view.format ? b->view.format : "B";
    const char got = f[0] ? f[strlen(f) - 1] : 'B';
    return got == 'l' && b->view.itemsize == 8 ? 'q' : got; /* int64 is 'l' where long is 64-bit */
}

/* buf_typed's check of a buffer opened with PyBUF_FORMAT; releases it when it fails. */
static int buf_check_typed(buf_t *b, Py_ssize_t count, char fmt, const char *name) {
    const char *f = b->view.format ? b->view.format : "B";
    const char got = buf_format(b);
    const Py_ssize_t size = fmt == 'd' || fmt == 'q' ? 8 : fmt == 'f' ? 4 : fmt == 'e' ? 2 : 1;
    if (got != fmt || b->view.itemsize != size || (count >= 0 && b->view.len != count * size)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of type '%c', got %zd bytes of '%s'", name, count, fmt,
                     b->view.len, f);
        buf_release(b);
        return -1;
    }
    return 0;
}

/* Borrow a C-contiguous buffer of `count` items (count < 0: any count) of struct type `fmt`: 'd' float64,
 * 'f' float32, 'b' int8, '?' bool, 'q' int64; obj may be None if `optional`. */
static int buf_typed(PyObject *obj, buf_t *b, Py_ssize_t count, char fmt, int writable, int optional,
                     const char *name) {
    const int rc = buf_open(obj, b, PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0), optional, name);
    return rc <= 0 ? rc : buf_check_typed(b, count, fmt, name);
}

static PyObject *py_moment_scores(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *omean, *ostd, *ologits, *oee, *oout = Py_None;
    int act;
    if (!PyArg_ParseTuple(args, "OOOOi|O", &omean, &ostd, &ologits, &oee, &act, &oout)) return NULL;
    if (act != EQ_ACT_LINEAR && act != EQ_ACT_SIGMOID && act != EQ_ACT_SOFTMAX)
        return PyErr_Format(PyExc_ValueError, "unknown activation code %d", act);
    buf_t bee = {0}, bmean = {0}, bstd = {0}, bl = {0}, bout = {0};
    PyObject *result = NULL;
    double ee1 = 0.0;
    const double *ee = &ee1;
    Py_ssize_t N = 1;
    if (PyFloat_Check(oee)) {
        ee1 = PyFloat_AS_DOUBLE(oee);
    } else {
        if (buf_typed(oee, &bee, -1, 'd', 0, 0, "expected_entropy")) goto done;
        N = bee.view.len / 8;
        ee = (const double *)bee.view.buf;
    }
    if (buf_typed(omean, &bmean, -1, 'd', 0, 0, "mean")) goto done;
    const Py_ssize_t C = N > 0 ? bmean.view.len / 8 / N : 0;
    if (N < 1 || C < 1 || bmean.view.len != N * C * 8 || (oout == Py_None && N != 1)) {
        PyErr_SetString(PyExc_ValueError, "mean must be [N, C] with N = len(expected_entropy) >= 1 (1 without out), C >= 1");
        goto done;
    }
    if (buf_typed(ostd, &bstd, N * C, 'd', 0, 0, "std") || buf_typed(oout, &bout, EQ_NUM_SCORES * N, 'd', 1, 1, "out"))
        goto done;
    /* float32 or float64, told apart by the buffer's own format: trying float32 first and clearing its
     * formatted error cost float64 logits (the samplers' dtype) a third of this call on every frame */
    if (buf_open(ologits, &bl, PyBUF_FORMAT, 0, "logits") < 0 ||
        buf_check_typed(&bl, N * C, buf_format(&bl) == 'f' ? 'f' : 'd', "logits (float32 or float64)"))
        goto done;
    const int l32 = bl.view.itemsize == 4;
    double one[EQ_NUM_SCORES];
    if (eq_moment_scores(N, C, (const double *)bmean.view.buf, (const double *)bstd.view.buf,
                         l32 ? (const float *)bl.view.buf : NULL, l32 ? NULL : (const double *)bl.view.buf, ee, act,
                         bout.held ? (double *)bout.view.buf : one) != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = bout.held ? py_none() : Py_BuildValue("(ddddd)", one[0], one[1], one[2], one[3], one[4]);
done:
    buf_release(&bee); buf_release(&bmean); buf_release(&bstd); buf_release(&bl); buf_release(&bout);
    return result;
}

/* lut8(src, table, out): out[i] = table[src[i]] for C-contiguous uint8 src, float32 table[256] and float32 out
 * of src's size. The preprocess of an 8-bit frame already at the model's size (edge_quq.preprocess.Preprocessor;
 * numpy's take is its reference): numpy's take first widens the indices to intp, which was most of a small
 * frame's preprocess. */
static PyObject *py_lut8(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *osrc, *otab, *oout;
    if (!PyArg_ParseTuple(args, "OOO", &osrc, &otab, &oout)) return NULL;
    buf_t src = {0}, tab = {0}, out = {0};
    PyObject *result = NULL;
    if (buf_typed(osrc, &src, -1, 'B', 0, 0, "src") || buf_typed(otab, &tab, 256, 'f', 0, 0, "table") ||
        buf_typed(oout, &out, src.view.len, 'f', 1, 0, "out"))
        goto done;
    const unsigned char *s = (const unsigned char *)src.view.buf;
    const float *t = (const float *)tab.view.buf;
    float *o = (float *)out.view.buf;
    for (Py_ssize_t i = 0; i < src.view.len; ++i) o[i] = t[s[i]];
    result = py_none();
done:
    buf_release(&src); buf_release(&tab); buf_release(&out);
    return result;
}

/* (keep, code, label, classes) of the one row the kernel just decided (kept: its kept-class bytes) */
static PyObject *one_decision(Py_ssize_t C, const uint8_t *kept, int8_t code, uint8_t keep, int64_t label) {
    Py_ssize_t n = 0;
    for (Py_ssize_t c = 0; c < C; ++c) n += kept[c];
    PyObject *classes = PyTuple_New(n);
    if (!classes) return NULL;
    for (Py_ssize_t c = 0, j = 0; c < C; ++c) {
        if (!kept[c]) continue;
        PyObject *v = PyLong_FromSsize_t(c);
        if (!v) { Py_DECREF(classes); return NULL; }
        PyTuple_SET_ITEM(classes, j++, v);
    }
    return Py_BuildValue("(NiLN)", PyBool_FromLong(keep), (int)code, (long long)label, classes);
}

static PyObject *py_interval_decide(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *omean, *ostd, *olo, *ohi, *ost, *ocode = Py_None, *okeep = Py_None, *okept = Py_None, *olab = Py_None;
    double z, thr;
    int mixed_keep;
    if (!PyArg_ParseTuple(args, "OOddpOOO|OOOO", &omean, &ostd, &z, &thr, &mixed_keep, &olo, &ohi, &ost, &ocode,
                          &okeep, &okept, &olab))
        return NULL;
    const int one = ocode == Py_None;
    buf_t bcode = {0}, bmean = {0}, bstd = {0}, blo = {0}, bhi = {0}, bst = {0}, bkeep = {0}, bkept = {0}, blab = {0};
    PyObject *result = NULL;
    uint8_t *kept1 = NULL;
    int8_t code1 = 0;
    uint8_t keep1 = 0;
    int64_t label1 = -1;
    if (buf_typed(ocode, &bcode, -1, 'b', 1, 1, "code_out")) return NULL;
    const Py_ssize_t N = one ? 1 : bcode.view.len;
    if (buf_typed(omean, &bmean, -1, 'd', 0, 0, "mean")) goto done;
    const Py_ssize_t C = N > 0 ? bmean.view.len / 8 / N : 0;
    if (N < 1 || C < 1 || bmean.view.len != N * C * 8) {
        PyErr_SetString(PyExc_ValueError, "mean must be [N, C] with N = len(code_out) >= 1 (1 without it), C >= 1");
        goto done;
    }
    if (buf_typed(ostd, &bstd, N * C, 'd', 0, 0, "std") || buf_typed(olo, &blo, N * C, 'd', 1, 0, "lower_out") ||
        buf_typed(ohi, &bhi, N * C, 'd', 1, 0, "upper_out") || buf_typed(ost, &bst, N * C, 'b', 1, 0, "states_out") ||
        buf_typed(okeep, &bkeep, N, '?', 1, one, "keep_out") || buf_typed(okept, &bkept, N * C, '?', 1, one, "kept_out") ||
        buf_typed(olab, &blab, N, 'q', 1, one, "labels_out"))
        goto done;
    if (one && !(kept1 = PyMem_Malloc((size_t)C))) {
        PyErr_NoMemory();
        goto done;
    }
    eq_interval_decide(N, C, (const double *)bmean.view.buf, (const double *)bstd.view.buf, z, thr, mixed_keep,
                       (double *)blo.view.buf, (double *)bhi.view.buf, (int8_t *)bst.view.buf,
                       one ? &code1 : (int8_t *)bcode.view.buf, one ? &keep1 : (uint8_t *)bkeep.view.buf,
                       one ? kept1 : (uint8_t *)bkept.view.buf, one ? &label1 : (int64_t *)blab.view.buf);
    result = one ? one_decision(C, kept1, code1, keep1, label1) : py_none();
done:
    PyMem_Free(kept1);
    buf_release(&bcode); buf_release(&bmean); buf_release(&bstd); buf_release(&blo); buf_release(&bhi);
    buf_release(&bst); buf_release(&bkeep); buf_release(&bkept); buf_release(&blab);
    return result;
}

/* mahalanobis(z, center, means2, msq, center0, d_out=None, rel_out=None, between=None): with d_out, rows z;
 * without it (one row), returns (d, rel or None) as floats: a frame's one row then needs no output arrays. With
 * between [(F + 1) * R], msq and means2 carry the background mean's column after the C classes' (frame.h). */
static PyObject *py_mahalanobis(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oz, *ocenter, *omeans2, *omsq, *ocenter0, *od = Py_None, *orel = Py_None, *obg = Py_None;
    if (!PyArg_ParseTuple(args, "OOOOO|OOO", &oz, &ocenter, &omeans2, &omsq, &ocenter0, &od, &orel, &obg)) return NULL;
    const int low_rank = obg != Py_None, with_rel = ocenter0 != Py_None || low_rank, one = od == Py_None;
    if (low_rank && ocenter0 != Py_None) {
        PyErr_SetString(PyExc_ValueError, "center0 and between exclude each other");
        return NULL;
    }
    buf_t bd = {0}, bcenter = {0}, bmsq = {0}, bz = {0}, bmeans = {0}, bc0 = {0}, brel = {0}, bbg = {0};
    PyObject *result = NULL;
    double d1 = 0.0, rel1 = 0.0;
    if (buf_typed(od, &bd, -1, 'd', 1, one, "d_out") || buf_typed(ocenter, &bcenter, -1, 'f', 0, 0, "center") ||
        buf_typed(omsq, &bmsq, -1, 'f', 0, 0, "msq") || buf_typed(obg, &bbg, -1, 'f', 0, 1, "between"))
        goto done;
    const Py_ssize_t N = one ? 1 : bd.view.len / 8, F = bcenter.view.len / 4, Cm = bmsq.view.len / 4;
    const Py_ssize_t C = low_rank ? Cm - 1 : Cm, R = low_rank ? bbg.view.len / 4 / (F + 1) : 0;
    if (N < 1 || F < 1 || C < 1 || (low_rank && (R < 1 || R * (F + 1) * 4 != bbg.view.len))) {
        PyErr_SetString(PyExc_ValueError, "empty rows, features or classes, or between not [F + 1, R]");
        goto done;
    }
    if (buf_typed(oz, &bz, N * F * (ocenter0 != Py_None ? 2 : 1), 'f', 0, 0, "z") ||
        buf_typed(omeans2, &bmeans, F * Cm, 'f', 0, 0, "means2") || buf_typed(ocenter0, &bc0, F, 'f', 0, 1, "center0") ||
        buf_typed(orel, &brel, N, 'd', 1, one || !with_rel, "rel_out"))
        goto done;
    double *rel = brel.held ? (double *)brel.view.buf : (one && with_rel ? &rel1 : NULL);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = eq_mahalanobis(N, F, C, (const float *)bz.view.buf, (const float *)bcenter.view.buf,
                        (const float *)bmeans.view.buf, (const float *)bmsq.view.buf,
                        bc0.held ? (const float *)bc0.view.buf : NULL, bbg.held ? (const float *)bbg.view.buf : NULL, R,
                        one ? &d1 : (double *)bd.view.buf, rel);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (!one)
        result = py_none();
    else if (with_rel)
        result = Py_BuildValue("(dd)", d1, rel1);
    else
        result = Py_BuildValue("(dO)", d1, Py_None);
done:
    buf_release(&bd); buf_release(&bcenter); buf_release(&bmsq); buf_release(&bz); buf_release(&bmeans);
    buf_release(&bc0); buf_release(&brel); buf_release(&bbg);
    return result;
}

/* The int8 whitener product (whitener.c): project_q8(x, q, off, scale, diag, S, z_out, isa=None). */
static PyObject *py_project_q8(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *oq, *ooff, *oscale, *odiag, *oz, *oisa = Py_None;
    int S;
    if (!PyArg_ParseTuple(args, "OOOOOiO|O", &ox, &oq, &ooff, &oscale, &odiag, &S, &oz, &oisa)) return NULL;
    const char *isa = NULL;
    if (oisa != Py_None && !(isa = PyUnicode_AsUTF8(oisa))) return NULL;
    buf_t bx = {0}, bq = {0}, boff = {0}, bs = {0}, bd = {0}, bz = {0};
    PyObject *result = NULL;
    if (S != 1 && S != 2) {
        PyErr_SetString(PyExc_ValueError, "S must be 1 or 2");
        return NULL;
    }
    if (buf_typed(oscale, &bs, -1, 'f', 0, 0, "scale") || buf_typed(ox, &bx, -1, 'f', 0, 0, "x") ||
        buf_typed(oq, &bq, -1, 'b', 0, 0, "q"))
        goto done;
    const Py_ssize_t F = bs.view.len / 4 / S, K = S * F, nx = bx.view.len / 4;
    if (F < 1 || F * S * 4 != bs.view.len || nx % F != 0 || nx == 0) {
        PyErr_SetString(PyExc_ValueError, "x must be [N >= 1, F] for scale [F, S]");
        goto done;
    }
    if (buf_typed(ooff, &boff, F + 1, 'q', 0, 0, "off") || buf_typed(odiag, &bd, K, 'f', 0, 0, "diag") ||
        buf_typed(oz, &bz, nx / F * K, 'f', 1, 0, "z_out"))
        goto done;
    /* the packed rows must tile q exactly, each a multiple of 16 and at most K rounded up to 16 long */
    const int64_t *off = (const int64_t *)boff.view.buf;
    int ok = off[0] == 0 && off[F] == bq.view.len;
    for (Py_ssize_t i = 0; ok && i < F; ++i) {
        const int64_t len = off[i + 1] - off[i];
        ok = len >= 0 && len % 16 == 0 && len <= (K + 15) / 16 * 16;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "off: the packed rows must tile q, each a multiple of 16 and at most K + 15");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = eq_project_q8(nx / F, F, S, (const float *)bx.view.buf, (const int8_t *)bq.view.buf, off,
                       (const float *)bs.view.buf, (const float *)bd.view.buf, (float *)bz.view.buf, isa);
    Py_END_ALLOW_THREADS
    if (rc == -2) PyErr_Format(PyExc_ValueError, "unknown or unsupported isa %R", oisa);
    else if (rc != 0) PyErr_NoMemory();
    else {
        result = Py_None;
        Py_INCREF(result);
    }
done:
    buf_release(&bx); buf_release(&bq); buf_release(&boff); buf_release(&bs); buf_release(&bd); buf_release(&bz);
    return result;
}

/* The names isa(0), isa(1), ... up to the first NULL, as a tuple of str. */
static PyObject *isa_names(const char *(*isa)(int)) {
    int n = 0;
    while (isa(n)) ++n;
    PyObject *t = PyTuple_New(n);
    if (!t) return NULL;
    for (int i = 0; i < n; ++i) {
        PyObject *s = PyUnicode_FromString(isa(i));
        if (!s) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

static PyObject *py_q8_isas(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return isa_names(eq_q8_isa);
}

/* rows x float32 [N, F] of a 2-D buffer: N, F; -1 with an error set otherwise */
static int rows_2d(const buf_t *b, const char *name, Py_ssize_t *N, Py_ssize_t *F) {
    if (b->view.ndim != 2 || b->view.shape[1] < 1) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D [rows, F >= 1]", name);
        return -1;
    }
    *N = b->view.shape[0];
    *F = b->view.shape[1];
    return 0;
}

/* The optional output of N values of type fmt: required for more than one row; -1 with an error set otherwise. */
static int rowdot_out(PyObject *oout, buf_t *bo, Py_ssize_t N, char fmt) {
    if (buf_typed(oout, bo, N, fmt, 1, oout == Py_None, "out")) return -1;
    if (oout == Py_None && N != 1) {
        PyErr_SetString(PyExc_ValueError, "out is required for more than one row");
        return -1;
    }
    return 0;
}

static PyObject *rowdot_result(int rc, PyObject *oisa, int one, double v) {
    if (rc == -2) return PyErr_Format(PyExc_ValueError, "unknown or unsupported isa %R, or k outside 1..B", oisa);
    if (rc != 0) return PyErr_NoMemory();
    return one ? PyFloat_FromDouble(v) : py_none();
}

/* rowdot.h's element type of a buffer format, plus one (0: not one the kernels read) */
static int rowdot_type(char fmt) {
    return fmt == 'f' ? EQ_RD_F32 + 1 : fmt == 'b' ? EQ_RD_I8 + 1 : fmt == 'e' ? EQ_RD_F16 + 1 : 0;
}

/* The kNN detector's k-th similarity (rowdot.h): knn_kth(x, bank, scale, k, out=None, isa=None), scale a number or,
 * for an int8 bank, float32 [B], one per row. */
static PyObject *py_knn_kth(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *obank, *oscale, *oout = Py_None, *oisa = Py_None;
    double scale = 1.0;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OOOn|OO", &ox, &obank, &oscale, &k, &oout, &oisa)) return NULL;
    const char *isa = NULL;
    if (oisa != Py_None && !(isa = PyUnicode_AsUTF8(oisa))) return NULL;
    /* a number (numpy's 0-d scalars too), or a buffer of one scale per row, held open from here (one acquisition
     * a frame) */
    buf_t bx = {0}, bb = {0}, bo = {0}, bs = {0};
    if (PyObject_CheckBuffer(oscale) && buf_open(oscale, &bs, PyBUF_FORMAT, 0, "scale") < 0) PyErr_Clear();
    if (bs.held && bs.view.ndim == 0) buf_release(&bs);
    if (!bs.held && (scale = PyFloat_AsDouble(oscale)) == -1.0 && PyErr_Occurred()) return NULL;
    PyObject *result = NULL;
    Py_ssize_t N, F;
    if (buf_typed(ox, &bx, -1, 'f', 0, 0, "x") || rows_2d(&bx, "x", &N, &F) ||
        buf_open(obank, &bb, PyBUF_FORMAT, 0, "bank") < 0)
        goto done;
    const char bf = buf_format(&bb);
    if (!rowdot_type(bf) || buf_check_typed(&bb, -1, bf, "bank") || bb.view.ndim != 2 || bb.view.shape[1] != F) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bank must be int8, float16 or float32 [B, F], F as x");
        goto done;
    }
    if (bs.held && (bf != 'b' || buf_check_typed(&bs, bb.view.shape[0], 'f', "scale"))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a scale per row needs an int8 bank");
        goto done;
    }
    if (rowdot_out(oout, &bo, N, 'f')) goto done;
    float one = 0.0f;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = eq_knn_kth(N, F, bb.view.shape[0], k, (const float *)bx.view.buf, bb.view.buf, rowdot_type(bf) - 1,
                    (float)scale, bs.held ? (const float *)bs.view.buf : NULL, bo.held ? (float *)bo.view.buf : &one, isa);
    Py_END_ALLOW_THREADS
    result = rowdot_result(rc, oisa, !bo.held, one);
done:
    buf_release(&bx); buf_release(&bb); buf_release(&bo); buf_release(&bs);
    return result;
}

/* ViM's residual norm (rowdot.h): vim_resid(x, origin, nsT, scale, out=None, isa=None), nsT float32 with scale None
 * or int8 with scale float32 [D]. */
static PyObject *py_vim_resid(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *oorigin, *ons, *oscale, *oout = Py_None, *oisa = Py_None;
    if (!PyArg_ParseTuple(args, "OOOO|OO", &ox, &oorigin, &ons, &oscale, &oout, &oisa)) return NULL;
    const char *isa = NULL;
    if (oisa != Py_None && !(isa = PyUnicode_AsUTF8(oisa))) return NULL;
    buf_t bx = {0}, borg = {0}, bns = {0}, bs = {0}, bo = {0};
    PyObject *result = NULL;
    Py_ssize_t N, F;
    if (buf_typed(ox, &bx, -1, 'f', 0, 0, "x") || rows_2d(&bx, "x", &N, &F) ||
        buf_typed(oorigin, &borg, F, 'f', 0, 0, "origin") || buf_open(ons, &bns, PyBUF_FORMAT, 0, "nsT") < 0)
        goto done;
    const char nf = buf_format(&bns);
    if (!rowdot_type(nf) || buf_check_typed(&bns, -1, nf, "nsT") || bns.view.ndim != 2 || bns.view.shape[1] != F) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "nsT must be int8, float16 or float32 [D, F], F as x");
        goto done;
    }
    /* the scales go with an int8 null space and only with it */
    if (buf_typed(oscale, &bs, bns.view.shape[0], 'f', 0, nf != 'b', "scale")) goto done;
    if (nf != 'b' && bs.held) {
        PyErr_SetString(PyExc_ValueError, "scale must be None for a float32 or float16 nsT");
        goto done;
    }
    if (rowdot_out(oout, &bo, N, 'd')) goto done;
    double one = 0.0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = eq_vim_resid(N, F, bns.view.shape[0], (const float *)bx.view.buf, (const float *)borg.view.buf,
                      bns.view.buf, rowdot_type(nf) - 1, bs.held ? (const float *)bs.view.buf : NULL,
                      bo.held ? (double *)bo.view.buf : &one, isa);
    Py_END_ALLOW_THREADS
    result = rowdot_result(rc, oisa, !bo.held, one);
done:
    buf_release(&bx); buf_release(&borg); buf_release(&bns); buf_release(&bs); buf_release(&bo);
    return result;
}

static PyObject *py_dots_isas(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return isa_names(eq_dots_isa);
}

/* The variants of dots_isas that read float16 rows on this CPU. */
static const char *dots_f16_isa(int i) {
    for (int j = 0, n = 0; eq_dots_isa(j); ++j)
        if (eq_dots_f16(eq_dots_isa(j)) && n++ == i) return eq_dots_isa(j);
    return NULL;
}

static PyObject *py_dots_f16_isas(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return isa_names(dots_f16_isa);
}

#define MOMENTS_DOC                                                                                              \
    "(x, w0, b0, w1, b1, p0, p1, activation, num_iter, mean_out, std_out, logits_out, *, seed=0, mask0=None, "   \
    "mask1=None, probs_out=None, isa=None, stats_out=None) -> expected_entropy\n\n"                                              \
    "x float32[F], w0 float32[F,H], b0 float32[H], w1 float32[H,C], b1 float32[C]; activation 0 linear, "       \
    "1 sigmoid, 2 softmax. Writes mean_out/std_out float64[C], logits_out float32[C] (eval-mode logits) and, if "  \
    "given, probs_out float32[T,C] and stats_out int64[1] (multiply-adds executed). isa picks a kernel variant from isas() ('scalar' = plain C reference; 'scalar_i8' the int8 variants' reference); "   \
    "w0q/w0s: the int8 variants' W0 from quantize_w0 (else quantised on every call). "      \
    "Releases the GIL."

static PyMethodDef methods[] = {
    {"moments", (PyCFunction)(void (*)(void))py_moments, METH_VARARGS | METH_KEYWORDS,
     "MC-dropout moments with the kernel's own PRNG (xoshiro256** seeded by splitmix64(seed)).\n" MOMENTS_DOC},
    {"moments_with_masks", (PyCFunction)(void (*)(void))py_moments_with_masks, METH_VARARGS | METH_KEYWORDS,
     "MC-dropout moments for caller-given uint8 0/1 keep masks mask0[T,F], mask1[T,H] (None: keep all).\n"
     MOMENTS_DOC},
    {"analytic_moments", py_analytic, METH_VARARGS,
     "analytic_moments(x, w0, b0, w1, b1, p0, p1, activation, temperature, mean_out, std_out, logits_out) -> "
     "expected_entropy\n\nClosed-form moments of the 2-block head (edge_quq.analytic's formulas, one pass over W0): "
     "mean_out/std_out float64[C] of activation(logits / temperature), logits_out float32[C] the raw eval-mode "
     "logits. Releases the GIL."},
    {"quantize_w0", py_quantize_w0, METH_VARARGS,
     "quantize_w0(w0, H, w0q_out, w0s_out) -> None\n\nInt8 W0 for the int8 variants (once per head): w0q_out int8[F, "
     "w0q_stride(H)], w0s_out float32[H] per-column scales; pass both to moments(..., w0q=, w0s=)."},
    {"w0q_stride", py_w0q_stride, METH_VARARGS, "w0q_stride(H) -> row length of quantize_w0's int8 W0."},
    {"is_int8", py_is_int8, METH_O, "is_int8(isa) -> True for a variant whose first layer runs in int8."},
    {"isa", py_isa, METH_NOARGS, "Name of the kernel variant used by default (the best this CPU supports)."},
    {"isas", py_isas, METH_NOARGS, "Kernel variants usable on this CPU, best first; the last is 'scalar'."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "CPU features detected at run time that the kernels care about."},
    {"moment_scores", py_moment_scores, METH_VARARGS,
     "moment_scores(mean, std, logits, expected_entropy, activation, out=None)\n\nThe moment scores of rows "
     "mean/std float64[N, C], logits float32 or float64[N, C], expected_entropy float64[N] (a float: one row); "
     "activation 0 linear, 1 sigmoid, 2 softmax. Writes out float64[5, N] (edge_quq.scores.MOMENT_SCORES; energy "
     "NaN for linear) and returns None; without out (one row), returns the 5 scores as a tuple."},
    {"interval_decide", py_interval_decide, METH_VARARGS,
     "interval_decide(mean, std, z, threshold, mixed_keep, lower_out, upper_out, states_out, code_out=None, "
     "keep_out=None, kept_out=None, labels_out=None)\n\nThe interval decision rule of rows mean/std float64[N, C]: "
     "writes lower/upper float64[N, C], states int8[N, C] and, given code_out, code int8[N], keep bool[N], kept "
     "bool[N, C], labels int64[N] (returns None). Without code_out (one row) returns (keep, code, label, classes)."},
    {"mahalanobis", py_mahalanobis, METH_VARARGS,
     "mahalanobis(z, center, means2, msq, center0, d_out=None, rel_out=None, between=None)\n\nThe Mahalanobis "
     "family's distances of projected rows z float32[N, F] (or [N, 2F] interleaved with the global projection when "
     "center0 float32[F] is given, else None; or the low-rank background between float32[F + 1, R], with the "
     "background mean's column last in means2 and msq): writes d_out float64[N] and rel_out float64[N] (None "
     "without center0 or between) and returns None; without d_out (one row), returns (d, rel) as floats (rel None "
     "without center0 or between). Releases the GIL."},
    {"project_q8", py_project_q8, METH_VARARGS,
     "project_q8(x, q, off, scale, diag, S, z_out, isa=None) -> None\n\nThe Mahalanobis family's int8 whitener "
     "product (whitener.h): rows x float32[N, F], packed int8 rows q with offsets off int64[F + 1], per-row scales "
     "float32[F, S], diagonal float32[S * F]; writes z_out float32[N, S * F]. Releases the GIL."},
    {"q8_isas", py_q8_isas, METH_NOARGS, "Variants of project_q8 usable on this CPU, best first; the last is 'scalar'."},
    {"knn_kth", py_knn_kth, METH_VARARGS,
     "knn_kth(x, bank, scale, k, out=None, isa=None)\n\nThe kNN detector's k-th largest cosine similarity (rowdot.h) "
     "of rows x float32[N, F] to bank int8 (times scale, a number or float32[B], one per row) or float32 [B, F]: "
     "writes out float32[N] and returns None; "
     "without out (one row), returns it as a float. Releases the GIL."},
    {"vim_resid", py_vim_resid, METH_VARARGS,
     "vim_resid(x, origin, nsT, scale, out=None, isa=None)\n\nViM's residual norm |(x - origin) @ (scale * nsT).T| "
     "(rowdot.h) of rows x float32[N, F], origin float32[F], nsT float32[D, F] (scale None) or int8[D, F] with "
     "per-row scales float32[D]: writes out float64[N] and returns None; without out (one row), returns it as a "
     "float. Releases the GIL."},
    {"dots_isas", py_dots_isas, METH_NOARGS, "Variants of knn_kth and vim_resid usable on this CPU, best first; the last is 'scalar'."},
    {"dots_f16_isas", py_dots_f16_isas, METH_NOARGS, "The variants of dots_isas that read float16 banks and null spaces on this CPU."},
    {"lut8", py_lut8, METH_VARARGS,
     "lut8(src, table, out) -> None\n\nout[i] = table[src[i]] for C-contiguous uint8 src, float32 table[256] and "
     "float32 out of src's size (numpy's take, without widening the indices)."},
    {"bernoulli_bits", py_bernoulli_bits, METH_VARARGS, "bernoulli_bits(p, seed, n) -> bytes: n uint64 drop-bit words."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_headkernel",
                                       "Native MC-dropout head kernel (NEON / SSE2 / AVX2+FMA / plain C).", -1,
                                       methods};

PyMODINIT_FUNC PyInit__headkernel(void) {
    eq_kernels_count(); /* fill the dispatch table while the GIL serialises imports */
    return PyModule_Create(&moduledef);
}
