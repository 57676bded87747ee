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
 * tun_to_wire(tun, sock, vnet_len, groups, port, budget)
 *     the plain-packet loop of loden.udp.worker.Worker.from_tun (read, route, TTL - 1,
 *     runs of equal-size datagrams sent with one UDP_SEGMENT sendmsg); hands anything
 *     else (offloads, no route) back to Python.
 * serve(epfd, ctl, tun, sock, vnet_len, groups, port, budget, max_bytes)
 *     the worker's epoll loop around the two passes below, back to Python only for
 *     control messages and the cases the passes hand back.
 * wire_to_tun(sock, tun, vnet_len, budget, max_bytes)
 *     the plain-packet loop of Worker.from_wire (recvmsg with UDP_GRO, validate,
 *     TTL - 1, one writev per packet); hands back the rest of a batch at the first TCP
 *     segment with payload, which the Python Decapsulator may coalesce.
 *
 * The two loops exist for the per-packet path (small UDP, ACKs, peers that send one
 * packet per datagram): there every packet costs a wake-up, and the Python loop's
 * ~5 us of interpreter work per packet, not the system calls, was the limit.
 *
 * Counters: the three loops return a Counters struct sequence (named fields, see
 * _fastpath.pyi); Python adds them up by name.
 *
 * NOT REENTRANT, one caller per process: tun_to_wire, wire_to_tun and serve share two
 * static buffers (rx_buf, run_buf: one 64 KB receive buffer and one UDP_SEGMENT run,
 * so no allocation per packet). A pass holds data in them across calls that allocate
 * Python objects (the peer lookup, the frame handed back), and an allocation can run
 * the garbage collector, whose finalizers may run Python code that releases the GIL
 * or calls back into this module; serve also drops the GIL in epoll_wait. A second
 * caller (another thread, or a finalizer) would overwrite a packet or a pending run.
 * The worker process is single-threaded, so this holds by construction; a call made
 * while another is in progress raises RuntimeError instead of corrupting data.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

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

/* TTL - 1 with the header checksum patched as RFC 1624 (packet.dec_ttl); TTL > 1. */
static inline void dec_ttl(uint8_t *ip) {
    ip[8] -= 1;
    uint32_t check = be16(ip + 10) + 0x0100;
    check = (check & 0xFFFF) + (check >> 16);
    if (check == 0xFFFF) {
        check = 0;
    }
    put16(ip + 10, check);
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


#define MAX_SEND_BYTES 65507
#define MAX_SEGMENTS 64
#define READ_SIZE (65536 + 16)

static uint8_t rx_buf[READ_SIZE];
static uint8_t run_buf[MAX_SEND_BYTES + 2048];

typedef struct {
    long tx_datagrams, tx_sends, tx_errors;
} send_stats;

/* One datagram, or a run of count datagrams of seg bytes (the last may be shorter). */
static void send_run(int sock, uint32_t ip, uint16_t port, const uint8_t *buf, size_t len,
                     size_t seg, int count, send_stats *st) {
    struct sockaddr_in to;
    memset(&to, 0, sizeof(to));
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    to.sin_addr.s_addr = htonl(ip);
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char space[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov,
                         .msg_iovlen = 1};
    if (count > 1) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof(control.space);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t gso = (uint16_t)seg;
        memcpy(CMSG_DATA(cm), &gso, sizeof(gso));
    }
    if (sendmsg(sock, &msg, 0) >= 0) {
        st->tx_datagrams += count;
        st->tx_sends += 1;
        return;
    }
    if (count > 1 && (errno == EINVAL || errno == EMSGSIZE || errno == EIO)) {
        /* The route's MTU is below the segment size (or GSO is refused): one by one. */
        for (size_t at = 0; at < len; at += seg) {
            size_t part = len - at < seg ? len - at : seg;
            send_run(sock, ip, port, buf + at, part, part, 1, st);
        }
        return;
    }
    st->tx_errors += 1;
}

/* The peer table for one call, converted and checked once at entry (check_groups):
 * one (mask, {network: public IP}) group per prefix length, longest first. The dicts
 * are owned references, so nothing a finalizer does to Python's list can free them
 * under a pass. */
#define MAX_GROUPS 33 /* prefix lengths /32 ... /0 */
typedef struct {
    Py_ssize_t n;
    uint32_t mask[MAX_GROUPS];
    PyObject *nets[MAX_GROUPS];
} route_table;

static void release_groups(route_table *t) {
    for (Py_ssize_t i = 0; i < t->n; i++) {
        Py_CLEAR(t->nets[i]);
    }
    t->n = 0;
}

/* Python's [(mask, {network: ip_u32})] into *t. Returns 0, or -1 with TypeError or
 * ValueError set (and nothing held). */
static int check_groups(PyObject *groups, route_table *t) {
    t->n = 0;
    if (!PyList_Check(groups)) {
        PyErr_SetString(PyExc_TypeError, "groups must be a list of (mask, dict)");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(groups);
    if (n > MAX_GROUPS) {
        PyErr_Format(PyExc_ValueError, "groups: %zd groups, at most %d (one per prefix length)",
                     n, MAX_GROUPS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *g = PyList_GET_ITEM(groups, i);
        if (!PyTuple_Check(g) || PyTuple_GET_SIZE(g) != 2 || !PyLong_Check(PyTuple_GET_ITEM(g, 0)) ||
            !PyDict_Check(PyTuple_GET_ITEM(g, 1))) {
            PyErr_SetString(PyExc_TypeError, "groups must be a list of (mask, dict)");
            release_groups(t);
            return -1;
        }
        unsigned long long mask = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(g, 0));
        if (mask == (unsigned long long)-1 && PyErr_Occurred()) {
            /* negative (ValueError... as OverflowError) or beyond 64 bits */
            PyErr_Clear();
            mask = 1ULL << 32;
        }
        if (mask > 0xFFFFFFFFULL) {
            PyErr_SetString(PyExc_ValueError, "groups: a mask must be a 32-bit unsigned int");
            release_groups(t);
            return -1;
        }
        t->mask[i] = (uint32_t)mask;
        t->nets[i] = Py_NewRef(PyTuple_GET_ITEM(g, 1));
        t->n = i + 1;
    }
    return 0;
}

/* The peer (public IP) for dst; -1 if none; -2 with a Python error set (a table value
 * that is not an IPv4 address as an int, or no memory). */
static int64_t lookup(const route_table *t, uint32_t dst) {
    for (Py_ssize_t i = 0; i < t->n; i++) {
        PyObject *key = PyLong_FromUnsignedLong(dst & t->mask[i]);
        if (key == NULL) {
            return -2;
        }
        PyObject *hit = PyDict_GetItemWithError(t->nets[i], key);
        Py_DECREF(key);
        if (hit == NULL) {
            if (PyErr_Occurred()) {
                return -2;
            }
            continue;
        }
        if (!PyLong_Check(hit)) {
            PyErr_SetString(PyExc_TypeError, "groups: a peer must be an IPv4 address as an int");
            return -2;
        }
        unsigned long long ip = PyLong_AsUnsignedLongLong(hit);
        if (ip == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            ip = 1ULL << 32;
        }
        if (ip > 0xFFFFFFFFULL) {
            PyErr_SetString(PyExc_ValueError, "groups: a peer must be a 32-bit unsigned int");
            return -2;
        }
        return (int64_t)ip;
    }
    return -1;
}

/* Counters of the plain-packet loops; returned to Python as a Counters struct sequence
 * whose field names are the worker's counter names. */
typedef struct {
    long tun_reads, tun_bytes, bad_from_tun, ttl_drops;
    long rx_calls, rx_bytes, rx_packets, rx_dropped, tun_writes, tun_write_errors;
    send_stats tx;
} counters;

static PyStructSequence_Field counter_fields[] = {
    {"tun_reads", "frames read from the TUN"},
    {"tun_bytes", "bytes read from the TUN"},
    {"bad_from_tun", "frames from the TUN that are not IPv4"},
    {"ttl_drops", "packets dropped at TTL 1"},
    {"tx_datagrams", "datagrams sent to peers"},
    {"tx_sends", "sendmsg calls that succeeded"},
    {"tx_errors", "sendmsg calls that failed"},
    {"rx_calls", "recvmsg calls that returned data"},
    {"rx_bytes", "bytes received from peers"},
    {"rx_packets", "packets written towards the TUN"},
    {"rx_dropped", "received segments dropped (malformed, TTL, receive errors)"},
    {"tun_writes", "writes to the TUN"},
    {"tun_write_errors", "writes to the TUN that failed"},
    {NULL, NULL},
};

static PyStructSequence_Desc counters_desc = {
    .name = "loden.udp._fastpath.Counters",
    .doc = "What one call of the C loops did (added to the worker's counters by name).",
    .fields = counter_fields,
    .n_in_sequence = 13,
};

static PyTypeObject *CountersType; /* created in PyInit__fastpath */

static PyObject *counters_object(const counters *c) {
    const long values[] = {c->tun_reads,       c->tun_bytes,      c->bad_from_tun,
                           c->ttl_drops,       c->tx.tx_datagrams, c->tx.tx_sends,
                           c->tx.tx_errors,    c->rx_calls,       c->rx_bytes,
                           c->rx_packets,      c->rx_dropped,     c->tun_writes,
                           c->tun_write_errors};
    PyObject *obj = PyStructSequence_New(CountersType);
    if (obj == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < (Py_ssize_t)(sizeof(values) / sizeof(values[0])); i++) {
        PyObject *v = PyLong_FromLong(values[i]);
        if (v == NULL) {
            Py_DECREF(obj);
            return NULL;
        }
        PyStructSequence_SET_ITEM(obj, i, v);
    }
    return obj;
}

/* The static buffers' owner (see the top of this file): set while a loop runs. */
static int busy;

static int enter(void) {
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "_fastpath loops are not reentrant: one caller per process");
        return -1;
    }
    busy = 1;
    return 0;
}

static int check_port(int port) {
    if (port < 0 || port > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "port must be 0..65535, not %d", port);
        return -1;
    }
    return 0;
}

/* The virtio-net header is absent (0) or 10/12 bytes (TUNSETVNETHDRSZ). */
static int check_vnet(Py_ssize_t vnet) {
    if (vnet != 0 && (vnet < 10 || vnet > 16)) {
        PyErr_SetString(PyExc_ValueError, "virtio header length must be 0 or 10..16");
        return -1;
    }
    return 0;
}

/* TUN -> wire for up to budget reads. Returns 0, or -1 with a Python error set. A frame
 * for Python (no route, offloads) ends the pass in *special; a read error in *err. */
static int tun_pass(int tun, int sock, Py_ssize_t vnet, const route_table *groups, int port,
                    Py_ssize_t budget, counters *c, PyObject **special, int *err) {
    int64_t cur_ip = -1;
    size_t cur_size = 0, cur_len = 0;
    int cur_n = 0;
    for (Py_ssize_t b = 0; b < budget; b++) {
        ssize_t n = read(tun, rx_buf, READ_SIZE);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                *err = errno;
            }
            break;
        }
        c->tun_reads++;
        c->tun_bytes += n;
        if (n < vnet + 20 || rx_buf[vnet] >> 4 != 4) {
            c->bad_from_tun++;
            continue;
        }
        uint8_t *pkt = rx_buf + vnet;
        int64_t peer = lookup(groups, be32(pkt + 16));
        if (peer == -2) {
            if (cur_n) { /* what was already routed still goes out */
                send_run(sock, (uint32_t)cur_ip, (uint16_t)port, run_buf, cur_len, cur_size,
                         cur_n, &c->tx);
            }
            return -1;
        }
        if (peer >= 0 && pkt[8] <= 1) {
            c->ttl_drops++;
            continue;
        }
        if (peer < 0 || (vnet && rx_buf[1])) {
            /* No route (an ICMP reply) or a GSO super-packet: Python does it. */
            *special = PyBytes_FromStringAndSize((const char *)rx_buf, n);
            if (*special == NULL) {
                return -1;
            }
            break;
        }
        size_t size = (size_t)(n - vnet);
        if (vnet && rx_buf[0] & 1) {
            /* NEEDS_CSUM (a pod's UDP/TCP with checksum offload): finish it, as
             * packet.finish_partial_checksum; the field holds the pseudo-header sum. */
            size_t start = (size_t)rx_buf[6] | ((size_t)rx_buf[7] << 8);
            size_t offset = (size_t)rx_buf[8] | ((size_t)rx_buf[9] << 8);
            if (start < size && start + offset + 2 <= size) {
                uint32_t value = canonical(add_words(pkt + start, (Py_ssize_t)(size - start)));
                if (value == 0 && offset == 6) {
                    value = 0xFFFF;
                }
                put16(pkt + start + offset, value);
            }
        }
        dec_ttl(pkt);
        if (peer == cur_ip && cur_n < MAX_SEGMENTS && size <= cur_size &&
            cur_len + size <= MAX_SEND_BYTES) {
            memcpy(run_buf + cur_len, pkt, size);
            cur_len += size;
            cur_n++;
            if (size < cur_size || (size_t)(cur_n + 1) * cur_size > MAX_SEND_BYTES) {
                send_run(sock, (uint32_t)cur_ip, (uint16_t)port, run_buf, cur_len, cur_size,
                         cur_n, &c->tx);
                cur_n = 0;
                cur_ip = -1;
            }
            continue;
        }
        if (cur_n) {
            send_run(sock, (uint32_t)cur_ip, (uint16_t)port, run_buf, cur_len, cur_size, cur_n,
                     &c->tx);
        }
        memcpy(run_buf, pkt, size);
        cur_ip = peer;
        cur_size = size;
        cur_len = size;
        cur_n = 1;
    }
    if (cur_n) {
        send_run(sock, (uint32_t)cur_ip, (uint16_t)port, run_buf, cur_len, cur_size, cur_n,
                 &c->tx);
    }
    return 0;
}

/* wire -> TUN for up to budget receives. Returns 0, or -1 with a Python error set. The
 * rest of a batch from its first TCP segment with payload ends the pass in *rest; a TUN
 * that is gone in *err. */
static int wire_pass(int sock, int tun, Py_ssize_t vnet, Py_ssize_t budget, Py_ssize_t max_bytes,
                     counters *c, PyObject **rest, int *err) {
    static const uint8_t zeros[16] = {0};
    union {
        char space[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    long total = 0;
    for (Py_ssize_t b = 0; b < budget && *err == 0 && *rest == NULL; b++) {
        struct iovec iov = {.iov_base = rx_buf, .iov_len = 65536};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof(control.space)};
        ssize_t n = recvmsg(sock, &msg, MSG_DONTWAIT);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                c->rx_dropped++;
            }
            break;
        }
        c->rx_calls++;
        c->rx_bytes += n;
        total += n;
        Py_ssize_t seg = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO) {
                int value;
                memcpy(&value, CMSG_DATA(cm), sizeof(value));
                seg = value;
            }
        }
        if (n == 0) {
            c->rx_dropped++;
            continue;
        }
        if (seg <= 0 || seg > n) {
            seg = n;
        }
        for (Py_ssize_t off = 0; off < n; off += seg) {
            Py_ssize_t end = off + seg < n ? off + seg : n;
            uint8_t *p = rx_buf + off;
            Py_ssize_t len = end - off;
            Py_ssize_t ihl = (p[0] & 0x0F) << 2;
            Py_ssize_t tot = len >= 20 ? (Py_ssize_t)be16(p + 2) : 0;
            if (len < 20 || p[0] >> 4 != 4 || ihl < 20 || ihl > len || tot < ihl || tot > len ||
                p[8] <= 1 || add_words(p, ihl) % 0xFFFF != 0) {
                c->rx_dropped++;
                continue;
            }
            if (p[9] == 6 && tot >= ihl + 20 && tot > ihl + ((p[ihl + 12] >> 4) << 2)) {
                /* A TCP segment with payload: it may join a run, and everything after it
                 * must stay behind it. The rest of the batch goes to Python. */
                *rest = Py_BuildValue("(y#n)", (const char *)p, (Py_ssize_t)(n - off), seg);
                if (*rest == NULL) {
                    return -1;
                }
                break;
            }
            c->rx_packets++;
            dec_ttl(p);
            struct iovec out[2] = {{.iov_base = (void *)zeros, .iov_len = (size_t)vnet},
                                   {.iov_base = p, .iov_len = (size_t)tot}};
            if (writev(tun, vnet ? out : out + 1, vnet ? 2 : 1) < 0) {
                if (errno == EBADFD || errno == ENODEV || errno == EIO) {
                    *err = errno;
                    break;
                }
                c->tun_write_errors++;
            }
            c->tun_writes++;
        }
        if (total >= max_bytes) {
            break;
        }
    }
    return 0;
}

/* The checks of a call that forwards with the peer table; on success the caller holds
 * *table and the static buffers until end_forwarding. Returns 0, or -1 with an error. */
static int begin_forwarding(Py_ssize_t vnet, int port, PyObject *groups, route_table *table) {
    if (check_vnet(vnet) < 0 || check_port(port) < 0 || check_groups(groups, table) < 0) {
        return -1;
    }
    if (enter() < 0) {
        release_groups(table);
        return -1;
    }
    return 0;
}

static void end_forwarding(route_table *table) {
    busy = 0;
    release_groups(table);
}

static PyObject *tun_to_wire(PyObject *self, PyObject *args) {
    int tun, sock, port;
    Py_ssize_t vnet, budget;
    PyObject *groups;
    if (!PyArg_ParseTuple(args, "iinOin", &tun, &sock, &vnet, &groups, &port, &budget)) {
        return NULL;
    }
    route_table table;
    if (begin_forwarding(vnet, port, groups, &table) < 0) {
        return NULL;
    }
    counters c = {0};
    PyObject *special = NULL;
    int err = 0;
    int ok = tun_pass(tun, sock, vnet, &table, port, budget, &c, &special, &err);
    end_forwarding(&table);
    if (ok < 0) {
        return NULL;
    }
    return Py_BuildValue("(NiN)", counters_object(&c), err, special ? special : Py_NewRef(Py_None));
}

static PyObject *wire_to_tun(PyObject *self, PyObject *args) {
    int sock, tun;
    Py_ssize_t vnet, budget, max_bytes;
    if (!PyArg_ParseTuple(args, "iinnn", &sock, &tun, &vnet, &budget, &max_bytes)) {
        return NULL;
    }
    if (check_vnet(vnet) < 0 || enter() < 0) {
        return NULL;
    }
    counters c = {0};
    PyObject *rest = NULL;
    int err = 0;
    int ok = wire_pass(sock, tun, vnet, budget, max_bytes, &c, &rest, &err);
    busy = 0;
    if (ok < 0) {
        return NULL;
    }
    return Py_BuildValue("(NiN)", counters_object(&c), err, rest ? rest : Py_NewRef(Py_None));
}

enum { SERVE_CONTROL = 0, SERVE_SPECIAL = 1, SERVE_REST = 2, SERVE_TUN_LOST = 3 };

/* The worker's event loop for plain traffic: returns to Python only for what it must
 * decide (a control message, a frame with no route or offloads, a batch with TCP data
 * to coalesce, a TUN that is gone), with the counters accumulated until then. */
static PyObject *serve_loop(int epfd, int ctl, int tun, int sock, Py_ssize_t vnet,
                            const route_table *groups, int port, Py_ssize_t budget,
                            Py_ssize_t max_bytes);

static PyObject *serve(PyObject *self, PyObject *args) {
    int epfd, ctl, tun, sock, port;
    Py_ssize_t vnet, budget, max_bytes;
    PyObject *groups;
    if (!PyArg_ParseTuple(args, "iiiinOinn", &epfd, &ctl, &tun, &sock, &vnet, &groups, &port,
                          &budget, &max_bytes)) {
        return NULL;
    }
    route_table table;
    if (begin_forwarding(vnet, port, groups, &table) < 0) {
        return NULL;
    }
    PyObject *result = serve_loop(epfd, ctl, tun, sock, vnet, &table, port, budget, max_bytes);
    end_forwarding(&table);
    return result;
}

static PyObject *serve_loop(int epfd, int ctl, int tun, int sock, Py_ssize_t vnet,
                            const route_table *groups, int port, Py_ssize_t budget,
                            Py_ssize_t max_bytes) {
    counters c = {0};
    struct epoll_event events[8];
    for (;;) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(epfd, events, 8, -1);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    return NULL;
                }
                continue;
            }
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) {  /* control first: a new peer table before packets */
            if (events[i].data.fd == ctl) {
                return Py_BuildValue("(NiO)", counters_object(&c), SERVE_CONTROL, Py_None);
            }
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd, err = 0;
            if (fd == sock) {
                PyObject *rest = NULL;
                if (wire_pass(sock, tun, vnet, budget, max_bytes, &c, &rest, &err) < 0) {
                    return NULL;
                }
                if (rest != NULL) {
                    return Py_BuildValue("(NiN)", counters_object(&c), SERVE_REST, rest);
                }
            } else if (fd == tun) {
                if (events[i].events & (EPOLLERR | EPOLLHUP) && !(events[i].events & EPOLLIN)) {
                    err = EBADFD;
                } else {
                    PyObject *special = NULL;
                    if (tun_pass(tun, sock, vnet, groups, port, budget, &c, &special, &err) < 0) {
                        return NULL;
                    }
                    if (special != NULL) {
                        return Py_BuildValue("(NiN)", counters_object(&c), SERVE_SPECIAL, special);
                    }
                }
            }
            if (err) {
                return Py_BuildValue("(Nii)", counters_object(&c), SERVE_TUN_LOST, err);
            }
        }
    }
}

static PyMethodDef methods[] = {
    {"segment_tcp4", segment_tcp4, METH_VARARGS,
     "Cut a TCP/IPv4 super-packet into wire-ready segments (see gso.segment_tcp4_py)."},
    {"gro_scan", gro_scan, METH_VARARGS,
     "Append the payloads of the segments that continue an open run (see gro.py)."},
    {"tun_to_wire", tun_to_wire, METH_VARARGS,
     "Forward plain packets from the TUN to their peers (see worker.Worker.from_tun)."},
    {"wire_to_tun", wire_to_tun, METH_VARARGS,
     "Write plain packets from the wire to the TUN (see worker.Worker.from_wire)."},
    {"serve", serve, METH_VARARGS,
     "The worker's event loop for plain traffic (see worker.Worker.run)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "C loops of the udp data path.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (CountersType == NULL) {
        CountersType = PyStructSequence_NewType(&counters_desc);
        if (CountersType == NULL) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddObjectRef(m, "Counters", (PyObject *)CountersType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
