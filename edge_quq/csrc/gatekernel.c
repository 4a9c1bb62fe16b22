/* edge_quq._gatekernel: the per-frame decision math in C (conformal p-values, their combination, one step
 * of the drift martingale, the scene test that feeds it).
 *
 * Why it exists: on one frame each of these is a handful of numpy calls on arrays of 2-20 numbers, and the
 * calls' fixed cost (about a microsecond each) was the whole cost of the decision. The numpy functions in
 * edge_quq/conformal.py and edge_quq/drift.py stay the reference; tests/test_gate_conformance.py runs both.
 * Plain C API and the buffer protocol, like _headkernel: no numpy headers. Every entry is batched over rows
 * where the reference is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

#include "pybuf.h"

/* Borrow a C-contiguous buffer whose items are `itemsize` bytes; its item count goes to *count. */
static int gbuf_get(PyObject *obj, buf_t *b, Py_ssize_t itemsize, int writable, Py_ssize_t *count, const char *name) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    b->held = 1;
    if (b->view.itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected items of %zd bytes, got %zd", name, itemsize, b->view.itemsize);
        buf_release(b);
        return -1;
    }
    *count = b->view.len / itemsize;
    return 0;
}

/* #{cal < s} in an ascending array (numpy's searchsorted, side "left"). */
static Py_ssize_t count_below(const double *cal, Py_ssize_t n, double s) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (cal[mid] < s) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* pvalues(scores [N*D] f64, cal f64 (each detector's ascending scores, concatenated), offsets [D+1] i64,
 * out [N*D] f64): out = (1 + #{cal_d >= s}) / (n_d + 1); a NaN score gets 0. */
static PyObject *py_pvalues(PyObject *self, PyObject *args) {
    PyObject *os, *oc, *oo, *out_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &os, &oc, &oo, &out_obj)) return NULL;
    buf_t s, c, o, out;
    Py_ssize_t ns, nc, no, nout;
    if (gbuf_get(os, &s, 8, 0, &ns, "scores") < 0) return NULL;
    if (gbuf_get(oc, &c, 8, 0, &nc, "cal") < 0) goto fail_s;
    if (gbuf_get(oo, &o, 8, 0, &no, "offsets") < 0) goto fail_c;
    if (gbuf_get(out_obj, &out, 8, 1, &nout, "out") < 0) goto fail_o;
    const int64_t *off = (const int64_t *)o.view.buf;
    Py_ssize_t d_count = no - 1;
    int ok = d_count >= 1 && nout == ns && ns % d_count == 0 && off[0] == 0 && off[d_count] == nc;
    for (Py_ssize_t d = 0; ok && d < d_count; ++d) ok = off[d + 1] > off[d];
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "pvalues: scores, offsets and out do not fit together");
        goto fail_all;
    }
    const double *sc = (const double *)s.view.buf, *cal = (const double *)c.view.buf;
    double *p = (double *)out.view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < ns; ++i) {
        Py_ssize_t d = i % d_count, n = (Py_ssize_t)(off[d + 1] - off[d]);
        double v = sc[i], plus_one = (double)n + 1.0;
        p[i] = v == v ? (plus_one - (double)count_below(cal + off[d], n, v)) / plus_one : 0.0;
    }
    Py_END_ALLOW_THREADS
    buf_release(&out); buf_release(&o); buf_release(&c); buf_release(&s);
    Py_RETURN_NONE;
fail_all:
    buf_release(&out);
fail_o:
    buf_release(&o);
fail_c:
    buf_release(&c);
fail_s:
    buf_release(&s);
    return NULL;
}

/* combine(p [N*D] f64, D, rule, scale, out [N] f64). rule 0, Bonferroni: min(1, D * min_d p); rule 1, the
 * corrected harmonic mean: min(1, scale / sum_d 1 / max(p, 1e-300)) with scale = c_D * D from Python. A NaN
 * anywhere in a row gives NaN, as numpy's minimum and sum do. */
static PyObject *py_combine(PyObject *self, PyObject *args) {
    PyObject *op, *out_obj;
    Py_ssize_t d_count;
    int rule;
    double scale;
    if (!PyArg_ParseTuple(args, "OnidO", &op, &d_count, &rule, &scale, &out_obj)) return NULL;
    buf_t p, out;
    Py_ssize_t np_, nout;
    if (gbuf_get(op, &p, 8, 0, &np_, "p") < 0) return NULL;
    if (gbuf_get(out_obj, &out, 8, 1, &nout, "out") < 0) { buf_release(&p); return NULL; }
    if (d_count < 1 || np_ != nout * d_count || (rule != 0 && rule != 1)) {
        PyErr_SetString(PyExc_ValueError, "combine: p, D, rule and out do not fit together");
        buf_release(&out); buf_release(&p);
        return NULL;
    }
    const double *pv = (const double *)p.view.buf;
    double *res = (double *)out.view.buf;
    for (Py_ssize_t i = 0; i < nout; ++i) {
        const double *row = pv + i * d_count;
        double acc = rule == 0 ? row[0] : 0.0;
        for (Py_ssize_t d = 0; d < d_count; ++d) {
            double v = row[d];
            if (rule == 0) acc = (v < acc || v != v) ? v : acc;  /* NaN sticks, as np.minimum */
            else acc += 1.0 / (v > 1e-300 || v != v ? v : 1e-300);
        }
        double r = rule == 0 ? (double)d_count * acc : scale / acc;
        res[i] = r > 1.0 ? 1.0 : r;  /* NaN stays NaN */
    }
    buf_release(&out); buf_release(&p);
    Py_RETURN_NONE;
}

/* minp(p [N*D] f64, D, m [n] f64 ascending, n1, out [N] f64): calibrated_minp (edge_quq/conformal.py),
 * (1 + #{m <= min_d p}) / n1 per row; a NaN anywhere in a row gives NaN. */
static PyObject *py_minp(PyObject *self, PyObject *args) {
    PyObject *op, *om, *out_obj;
    Py_ssize_t d_count;
    double n1;
    if (!PyArg_ParseTuple(args, "OnOdO", &op, &d_count, &om, &n1, &out_obj)) return NULL;
    buf_t p, m, out;
    Py_ssize_t np_, nm, nout;
    if (gbuf_get(op, &p, 8, 0, &np_, "p") < 0) return NULL;
    if (gbuf_get(om, &m, 8, 0, &nm, "m") < 0) { buf_release(&p); return NULL; }
    if (gbuf_get(out_obj, &out, 8, 1, &nout, "out") < 0) { buf_release(&m); buf_release(&p); return NULL; }
    if (d_count < 1 || np_ != nout * d_count) {
        PyErr_SetString(PyExc_ValueError, "minp: p, D and out do not fit together");
        buf_release(&out); buf_release(&m); buf_release(&p);
        return NULL;
    }
    const double *pv = (const double *)p.view.buf, *mv = (const double *)m.view.buf;
    double *res = (double *)out.view.buf;
    for (Py_ssize_t i = 0; i < nout; ++i) {
        const double *row = pv + i * d_count;
        double low = row[0];
        for (Py_ssize_t d = 0; d < d_count; ++d) low = (row[d] < low || row[d] != row[d]) ? row[d] : low;
        if (low != low) { res[i] = low; continue; }
        Py_ssize_t lo = 0, hi = nm;  /* #{m <= low}: numpy's searchsorted, side "right" */
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (mv[mid] <= low) lo = mid + 1;
            else hi = mid;
        }
        res[i] = (1.0 + (double)lo) / n1;
    }
    buf_release(&out); buf_release(&m); buf_release(&p);
    Py_RETURN_NONE;
}

/* bet(share [K] f64 in/out, eps [K], eps_m1 [K], keep, pool, p, power) -> total.
 * One fed p-value: every expert keeps `keep` of its share plus `pool`, then bets f_k(p) (power:
 * eps * p^(eps - 1); simple: 1 + eps (p - 1/2)). Returns the new total (the factor the martingale grows by)
 * and leaves the shares normalised to sum 1. p must already be floored and capped (DriftMonitor._bet). */
static PyObject *py_bet(PyObject *self, PyObject *args) {
    PyObject *osh, *oe, *oem;
    double keep, pool, pval;
    int power;
    if (!PyArg_ParseTuple(args, "OOOdddp", &osh, &oe, &oem, &keep, &pool, &pval, &power)) return NULL;
    buf_t sh, e, em;
    Py_ssize_t k, ke, kem;
    if (gbuf_get(osh, &sh, 8, 1, &k, "share") < 0) return NULL;
    if (gbuf_get(oe, &e, 8, 0, &ke, "eps") < 0) { buf_release(&sh); return NULL; }
    if (gbuf_get(oem, &em, 8, 0, &kem, "eps_m1") < 0) { buf_release(&e); buf_release(&sh); return NULL; }
    if (k < 1 || ke != k || kem != k) {
        PyErr_SetString(PyExc_ValueError, "bet: share, eps and eps_m1 must have the same size >= 1");
        buf_release(&em); buf_release(&e); buf_release(&sh);
        return NULL;
    }
    double *share = (double *)sh.view.buf;
    const double *eps = (const double *)e.view.buf, *eps_m1 = (const double *)em.view.buf;
    double logp = log(pval), total = 0.0;
    for (Py_ssize_t i = 0; i < k; ++i) {
        double b = power ? eps[i] * exp(eps_m1[i] * logp) : 1.0 + eps[i] * (pval - 0.5);
        share[i] = (keep * share[i] + pool) * b;
        total += share[i];
    }
    for (Py_ssize_t i = 0; i < k; ++i) share[i] /= total;
    buf_release(&em); buf_release(&e); buf_release(&sh);
    return PyFloat_FromDouble(total);
}

/* scene(memory [M*F] f64, rows, feature [F] f32 or f64, unit_out [F] f64) -> max dot.
 * Writes feature / max(|feature|, 1e-12) to unit_out and returns the largest dot product of it with the
 * first `rows` rows of memory (-inf when rows == 0): the scene feed's "have I seen this frame?" test. */
static PyObject *py_scene(PyObject *self, PyObject *args) {
    PyObject *om, *of, *ou;
    Py_ssize_t rows;
    if (!PyArg_ParseTuple(args, "OnOO", &om, &rows, &of, &ou)) return NULL;
    buf_t m, u;
    Py_buffer f;
    Py_ssize_t nm, nu;
    if (gbuf_get(om, &m, 8, 0, &nm, "memory") < 0) return NULL;
    if (gbuf_get(ou, &u, 8, 1, &nu, "unit_out") < 0) { buf_release(&m); return NULL; }
    if (PyObject_GetBuffer(of, &f, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) { buf_release(&u); buf_release(&m); return NULL; }
    const char *fmt = f.format ? f.format : "B";
    int is_f64 = f.itemsize == 8 && (fmt[0] == 'd' || (fmt[0] == '<' && fmt[1] == 'd') || (fmt[0] == '=' && fmt[1] == 'd'));
    int is_f32 = f.itemsize == 4 && (fmt[0] == 'f' || (fmt[0] == '<' && fmt[1] == 'f') || (fmt[0] == '=' && fmt[1] == 'f'));
    Py_ssize_t nf = f.len / (f.itemsize ? f.itemsize : 1);
    if (!(is_f64 || is_f32) || nf != nu || nf < 1 || rows < 0 || rows * nf > nm) {
        PyErr_SetString(PyExc_ValueError, "scene: feature must be float32/float64 of the memory's width");
        PyBuffer_Release(&f); buf_release(&u); buf_release(&m);
        return NULL;
    }
    double *unit = (double *)u.view.buf, norm2 = 0.0;
    for (Py_ssize_t i = 0; i < nf; ++i) {
        double v = is_f64 ? ((const double *)f.buf)[i] : (double)((const float *)f.buf)[i];
        unit[i] = v;
        norm2 += v * v;
    }
    double norm = sqrt(norm2);
    norm = norm > 1e-12 ? norm : 1e-12;
    for (Py_ssize_t i = 0; i < nf; ++i) unit[i] /= norm;
    double best = -INFINITY;
    const double *mem = (const double *)m.view.buf;
    for (Py_ssize_t r = 0; r < rows; ++r) {
        double dot = 0.0;
        for (Py_ssize_t i = 0; i < nf; ++i) dot += mem[r * nf + i] * unit[i];
        best = dot > best ? dot : best;
    }
    PyBuffer_Release(&f); buf_release(&u); buf_release(&m);
    return PyFloat_FromDouble(best);
}

static PyMethodDef methods[] = {
    {"pvalues", py_pvalues, METH_VARARGS, "Conformal p-values of [N, D] scores against sorted calibration scores."},
    {"combine", py_combine, METH_VARARGS, "Bonferroni or corrected harmonic-mean combination of [N, D] p-values."},
    {"minp", py_minp, METH_VARARGS, "calibrated_minp combination of [N, D] p-values against sorted m_i."},
    {"bet", py_bet, METH_VARARGS, "One step of the jumper martingale on expert shares; returns the growth factor."},
    {"scene", py_scene, METH_VARARGS, "Unit-normalise a feature and return its largest dot with stored ones."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gatekernel",
                                    "Per-frame decision math in C; edge_quq.conformal and edge_quq.drift are the reference.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__gatekernel(void) { return PyModule_Create(&module); }
