/*
 * Optional C versions of the udp data path's two per-segment loops.
 *
 * Why: the pure-Python sender and receiver (gso.py, gro.py) cost 3-7 us of CPU per
 * 1.4 KB segment, most of it the TCP checksum (sender) and per-segment header checks
 * (receiver); at that price the forwarders, not the kernel, bound the throughput. These
 * functions do exactly what the Python ones do, byte for byte (tests compare both on
 * the same inputs), and leave system calls, peer lookup and everything else in Python.
 * If the extension cannot be built (no compiler), the Python versions are used.
 *
 * segment_tcp4(pkt, mss) -> (iov, segment_length, count) | None
 *     as loden.udp.gso.segment_tcp4_py.
 * gro_scan(data, mv, off, n, seg, first, hl, nseq, mss, total, max_super, payloads)
 *     -> (off, nseq, total, joined, closed, psh)
 *     the "continues the open run" loop of loden.udp.gro.Decapsulator.feed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

static inline uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Sum of big-endian 16-bit words; an odd last byte is padded with a zero byte. */
static uint64_t add_words(const uint8_t *p, Py_ssize_t n) {
    uint64_t s = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s += be16(p + i) + be16(p + i + 2) + be16(p + i + 4) + be16(p + i + 6);
    }
    for (; i + 2 <= n; i += 2) {
        s += be16(p + i);
    }
    if (i < n) {
        s += (uint32_t)p[i] << 8;
    }
    return s;
}

/* The canonical checksum Python computes as -(s) % 0xFFFF (0 rather than 0xFFFF). */
static inline uint32_t canonical(uint64_t s) { return (uint32_t)((0xFFFF - s % 0xFFFF) % 0xFFFF); }

static PyObject *segment_tcp4(PyObject *self, PyObject *args) {
    PyObject *mv;
    Py_ssize_t mss;
    if (!PyArg_ParseTuple(args, "On", &mv, &mss)) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const uint8_t *pkt = view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL;
    if (n < 40 || mss <= 0) {
        goto none;
    }
    Py_ssize_t ihl = (pkt[0] & 0x0F) << 2;
    if (ihl < 20 || n < ihl + 20 || pkt[9] != 6) {
        goto none;
    }
    Py_ssize_t thl = (pkt[ihl + 12] >> 4) << 2;
    Py_ssize_t hl = ihl + thl;
    if (thl < 20 || n <= hl) {
        goto none;
    }
    uint32_t ident = be16(pkt + 4);
    uint32_t seq = be32(pkt + ihl + 4);
    uint32_t off_flags = be16(pkt + ihl + 12);
    uint32_t flags = off_flags & 0x01FF;
    uint32_t doff = off_flags & 0xF000;
    /* Pseudo-header without the length, and addresses: the same for every segment. */
    uint64_t pseudo = add_words(pkt + 12, 8) + 6;
    Py_ssize_t plen = n - hl;
    Py_ssize_t last = (plen - 1) / mss;
    Py_ssize_t count = last + 1;
    PyObject *iov = PyList_New(2 * count);
    if (iov == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t off = i * mss;
        Py_ssize_t size = i < last ? mss : plen - off;
        uint32_t word;
        if (i < last) {
            word = doff | (flags & (i == 0 ? ~(uint32_t)(TCP_FIN | TCP_PSH)
                                           : ~(uint32_t)(TCP_FIN | TCP_PSH | TCP_CWR)));
        } else {
            word = last ? doff | (flags & ~(uint32_t)TCP_CWR) : doff | flags;
        }
        PyObject *hdr = PyBytes_FromStringAndSize((const char *)pkt, hl);
        if (hdr == NULL) {
            Py_DECREF(iov);
            goto done;
        }
        uint8_t *h = (uint8_t *)PyBytes_AS_STRING(hdr);
        put16(h + 2, (uint32_t)(hl + size));
        put16(h + 4, (ident + (uint32_t)i) & 0xFFFF);
        h[8] = (uint8_t)(pkt[8] - 1);
        put16(h + 10, 0);
        put16(h + 10, canonical(add_words(h, ihl)));
        uint8_t *t = h + ihl;
        put32(t + 4, seq + (uint32_t)off);
        put16(t + 12, word);
        put16(t + 16, 0);
        uint64_t s = pseudo + (uint64_t)(thl + size) + add_words(t, thl) +
                     add_words(pkt + hl + off, size);
        put16(t + 16, canonical(s));
        PyObject *payload = PySequence_GetSlice(mv, hl + off, hl + off + size);
        if (payload == NULL) {
            Py_DECREF(hdr);
            Py_DECREF(iov);
            goto done;
        }
        PyList_SET_ITEM(iov, 2 * i, hdr);
        PyList_SET_ITEM(iov, 2 * i + 1, payload);
    }
    result = Py_BuildValue("(Nnn)", iov, hl + (mss < plen ? mss : plen), count);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

/* Does the header at p join the run whose first header is f (both hl bytes)? Everything
 * must be equal but total length, IP ID, IP checksum, sequence number, the PSH flag and
 * the TCP checksum (gro._run_mask). */
static inline int same_run(const uint8_t *p, const uint8_t *f, Py_ssize_t hl) {
    return memcmp(p, f, 2) == 0 && memcmp(p + 6, f + 6, 4) == 0 &&
           memcmp(p + 12, f + 12, 12) == 0 && memcmp(p + 28, f + 28, 5) == 0 &&
           ((p[33] ^ f[33]) & ~TCP_PSH) == 0 && memcmp(p + 34, f + 34, 2) == 0 &&
           memcmp(p + 38, f + 38, (size_t)(hl - 38)) == 0;
}

static PyObject *gro_scan(PyObject *self, PyObject *args) {
    PyObject *data_obj, *mv, *first_obj, *payloads;
    Py_ssize_t off, n, seg, hl, mss, total, max_super;
    unsigned long long nseq_in;
    if (!PyArg_ParseTuple(args, "OOnnnOnKnnnO!", &data_obj, &mv, &off, &n, &seg, &first_obj,
                          &hl, &nseq_in, &mss, &total, &max_super, &PyList_Type, &payloads)) {
        return NULL;
    }
    if (hl < 40 || seg <= 0) {
        PyErr_SetString(PyExc_ValueError, "gro_scan: bad header length or segment size");
        return NULL;
    }
    Py_buffer data, first;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(first_obj, &first, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    if (first.len < hl || n > data.len || off < 0) {
        PyErr_SetString(PyExc_ValueError, "gro_scan: buffers shorter than stated");
        goto done;
    }
    const uint8_t *base = data.buf;
    const uint8_t *f = first.buf;
    uint32_t nseq = (uint32_t)nseq_in;
    Py_ssize_t joined = 0;
    int closed = 0, psh = 0;
    while (off < n) {
        Py_ssize_t end = off + seg < n ? off + seg : n;
        if (end - off < hl) {
            break;
        }
        const uint8_t *p = base + off;
        if (!same_run(p, f, hl) || be32(p + 24) != nseq) {
            break;
        }
        Py_ssize_t tot = be16(p + 2);
        Py_ssize_t plen = tot - hl;
        if (!(plen > 0 && plen <= mss && off + tot <= end && add_words(p, 20) % 0xFFFF == 0 &&
              total + plen <= max_super)) {
            break;
        }
        PyObject *payload = PySequence_GetSlice(mv, off + hl, off + tot);
        if (payload == NULL) {
            goto done;
        }
        int rc = PyList_Append(payloads, payload);
        Py_DECREF(payload);
        if (rc < 0) {
            goto done;
        }
        total += plen;
        nseq = nseq + (uint32_t)plen;
        joined++;
        off = end;
        psh = (p[33] & TCP_PSH) != 0;
        if (plen < mss || psh) {
            closed = 1;
            break;
        }
    }
    result = Py_BuildValue("(nKnnii)", off, (unsigned long long)nseq, total, joined, closed, psh);
done:
    PyBuffer_Release(&first);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"segment_tcp4", segment_tcp4, METH_VARARGS,
     "Cut a TCP/IPv4 super-packet into wire-ready segments (see gso.segment_tcp4_py)."},
    {"gro_scan", gro_scan, METH_VARARGS,
     "Append the payloads of the segments that continue an open run (see gro.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "C loops of the udp data path.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
