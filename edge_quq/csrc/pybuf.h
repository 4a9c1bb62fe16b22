/* A borrowed Python buffer and its release, shared by the extension modules (_headkernel, _gatekernel).
 * Include after Python.h. */
#ifndef EQ_PYBUF_H
#define EQ_PYBUF_H

typedef struct {
    Py_buffer view;
    int held;
} buf_t;

static inline void buf_release(buf_t *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

#endif
