/* Chunk lines built from text-protocol row packets, in C.
 *
 * The dump's default query asks the server for each row's finished chunk line (one
 * escaped column). With this module built, the dump instead selects every stored column
 * as `CAST(... AS BINARY)` and this code writes the line: fields joined by a tab, NULL
 * (the 0xFB marker) as `\N`, and a backslash before backslash, tab and newline, NUL
 * written as `\0`: the same bytes `checksum.line_expression` yields (DESIGN.md's chunk
 * format). It also adds each line's CRC-32 (zlib's values; folded with PCLMULQDQ where the
 * CPU has it, FOLDED_CRC says) to the chunk's sum and XOR, so
 * Python never touches a row. Packets are read without the GIL held.
 *
 *   scan(buf, pos, seq, ncols) -> (lines, rows, crc_sum, crc_xor, pos, seq)
 *       Every whole row packet in buf[pos:] with the expected sequence id, until a
 *       packet that is cut by the buffer's end, out of sequence, EOF, an error, or 16 MB
 *       or longer (continued in further packets). `lines` ends each line with '\n'.
 *   row(payload, ncols) -> (line, crc)
 *       One row's whole payload (already reassembled), for the packets `scan` leaves.
 *
 * A payload whose fields do not add up to its length raises ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* The byte written after a backslash for each byte that needs one; 0 = copy as is. */
static unsigned char escaped_as[256];

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
/* Non-zero when some byte of x is zero (exact as a yes/no answer). */
#define HAS_ZERO(x) (((x) - ONES) & ~(x) & HIGHS)

static inline int word_is_plain(uint64_t w)
{
    uint64_t tab = w ^ (ONES * '\t'), lf = w ^ (ONES * '\n'), bs = w ^ (ONES * '\\');
    return !(HAS_ZERO(w) | HAS_ZERO(tab) | HAS_ZERO(lf) | HAS_ZERO(bs));
}

/* One field's value, escaped, at out; returns the end of what was written. */
static inline unsigned char *escape_into(unsigned char *out, const unsigned char *v, size_t n)
{
    const unsigned char *end = v + n;
    while ((size_t)(end - v) >= 8) {
        uint64_t w;
        memcpy(&w, v, 8);
        if (word_is_plain(w)) {
            memcpy(out, &w, 8);
            out += 8;
            v += 8;
            continue;
        }
        for (int i = 0; i < 8; i++) {
            unsigned char c = v[i], e = escaped_as[c];
            if (e) {
                *out++ = '\\';
                *out++ = e;
            } else {
                *out++ = c;
            }
        }
        v += 8;
    }
    while (v < end) {
        unsigned char c = *v++, e = escaped_as[c];
        if (e) {
            *out++ = '\\';
            *out++ = e;
        } else {
            *out++ = c;
        }
    }
    return out;
}

/* The line for one row payload [p, end) of ncols fields, written at out (no newline).
 * Returns its length, or -1 when the payload is not ncols length-coded fields. out must
 * have room for 3 * (end - p) bytes. */
static Py_ssize_t row_line(const unsigned char *p, const unsigned char *end, int ncols,
                           unsigned char *out)
{
    unsigned char *o = out;
    for (int i = 0; i < ncols; i++) {
        uint64_t len;
        if (i)
            *o++ = '\t';
        if (p >= end)
            return -1;
        unsigned char first = *p++;
        if (first < 251) {
            len = first;
        } else if (first == 0xFB) { /* NULL */
            *o++ = '\\';
            *o++ = 'N';
            continue;
        } else if (first == 0xFC) {
            if (end - p < 2)
                return -1;
            len = (uint64_t)p[0] | ((uint64_t)p[1] << 8);
            p += 2;
        } else if (first == 0xFD) {
            if (end - p < 3)
                return -1;
            len = (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16);
            p += 3;
        } else if (first == 0xFE) {
            if (end - p < 8)
                return -1;
            len = 0;
            for (int k = 7; k >= 0; k--)
                len = (len << 8) | p[k];
            p += 8;
        } else {
            return -1;
        }
        if (len > (uint64_t)(end - p))
            return -1;
        o = escape_into(o, p, (size_t)len);
        p += len;
    }
    if (p != end)
        return -1;
    return o - out;
}

static uint32_t zlib_crc(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n > 0) { /* zlib takes at most 4 GiB per call */
        uInt step = n > 0x40000000u ? 0x40000000u : (uInt)n;
        crc = (uint32_t)crc32(crc, p, step);
        p += step;
        n -= step;
    }
    return crc;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_FOLD 1

/* zlib's CRC-32 computed by folding 16-byte blocks with carry-less multiplication
 * (PCLMULQDQ), about 2.5x zlib's speed on lines of a few hundred bytes. The constants are
 * x^(k) mod P for the reflected polynomial at the fold distances of 512 bits (four blocks
 * in flight) and 128 bits (one). Folding keeps the message's remainder, so the 16 folded
 * bytes, run through zlib's CRC from a zero register, finish the sum; the tail under 16
 * bytes follows through zlib too. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t fold_crc(uint32_t crc,
                                                                   const unsigned char *p,
                                                                   size_t n)
{
    if (n < 64)
        return zlib_crc(crc, p, n);
    const __m128i far = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i near = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
#define LOAD(at) _mm_loadu_si128((const __m128i *)(at))
#define FOLD(x, k, next)                                                                      \
    _mm_xor_si128(                                                                            \
        _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)),   \
        next)
    __m128i x0 = _mm_xor_si128(LOAD(p), _mm_cvtsi32_si128((int)~crc));
    __m128i x1 = LOAD(p + 16), x2 = LOAD(p + 32), x3 = LOAD(p + 48);
    p += 64;
    n -= 64;
    while (n >= 64) {
        x0 = FOLD(x0, far, LOAD(p));
        x1 = FOLD(x1, far, LOAD(p + 16));
        x2 = FOLD(x2, far, LOAD(p + 32));
        x3 = FOLD(x3, far, LOAD(p + 48));
        p += 64;
        n -= 64;
    }
    __m128i x = FOLD(FOLD(FOLD(x0, near, x1), near, x2), near, x3);
    while (n >= 16) {
        x = FOLD(x, near, LOAD(p));
        p += 16;
        n -= 16;
    }
#undef FOLD
#undef LOAD
    unsigned char folded[16];
    _mm_storeu_si128((__m128i *)folded, x);
    return zlib_crc(zlib_crc(0xFFFFFFFFu, folded, 16), p, n);
}
#endif

static int use_fold; /* set once at import: the CPU has PCLMULQDQ and SSE4.1 */

static uint32_t line_crc(const unsigned char *line, Py_ssize_t n)
{
#ifdef HAVE_FOLD
    if (use_fold)
        return fold_crc(0, line, (size_t)n);
#endif
    return zlib_crc(0, line, (size_t)n);
}

static PyObject *rowlines_scan(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    int seq, ncols;
    if (!PyArg_ParseTuple(args, "y*nii", &view, &pos, &seq, &ncols))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t size = view.len;
    if (pos < 0 || pos > size || ncols < 1 || seq < 0 || seq > 255) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan: bad position, sequence or column count");
        return NULL;
    }
    /* A field of k payload bytes writes at most 2k + 1 (escapes, separator), a NULL 2 + 1
     * for 1: a row writes at most 3 * payload + 1, and each payload has a 4-byte header. */
    Py_ssize_t room = 3 * (size - pos) + 64;
    PyObject *out = PyBytes_FromStringAndSize(NULL, room);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *start = o;
    unsigned long long rows = 0, crc_sum = 0;
    uint32_t crc_xor = 0;
    int bad = 0;

    Py_BEGIN_ALLOW_THREADS
    while (pos + 4 < size) {
        Py_ssize_t length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16);
        Py_ssize_t end = pos + 4 + length;
        if (end > size || buf[pos + 3] != seq || length == 0 || length == 0xFFFFFF)
            break;
        unsigned char first = buf[pos + 4];
        if (first == 0xFF || (first == 0xFE && length < 9))
            break; /* an error or EOF packet: Python reads it */
        Py_ssize_t n = row_line(buf + pos + 4, buf + end, ncols, o);
        if (n < 0) {
            bad = 1;
            break;
        }
        uint32_t crc = line_crc(o, n);
        crc_sum += crc;
        crc_xor ^= crc;
        o += n;
        *o++ = '\n';
        rows++;
        seq = (seq + 1) & 0xFF;
        pos = end;
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&view);
    if (bad) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "a row packet does not hold %d length-coded fields",
                     ncols);
        return NULL;
    }
    if (_PyBytes_Resize(&out, o - start) < 0)
        return NULL;
    return Py_BuildValue("(NKKknI)", out, rows, crc_sum, (unsigned long)crc_xor, pos,
                         (unsigned int)seq);
}

static PyObject *rowlines_row(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int ncols;
    if (!PyArg_ParseTuple(args, "y*i", &view, &ncols))
        return NULL;
    if (ncols < 1) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "row: bad column count");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, 3 * view.len + 64);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *p = view.buf;
    Py_ssize_t n;
    uint32_t crc = 0;
    Py_BEGIN_ALLOW_THREADS
    n = row_line(p, p + view.len, ncols, o);
    if (n >= 0) {
        crc = line_crc(o, n);
        o[n] = '\n';
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (n < 0) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "a row packet does not hold %d length-coded fields",
                     ncols);
        return NULL;
    }
    if (_PyBytes_Resize(&out, n + 1) < 0)
        return NULL;
    return Py_BuildValue("(Nk)", out, (unsigned long)crc);
}

static PyMethodDef methods[] = {
    {"scan", rowlines_scan, METH_VARARGS,
     "scan(buf, pos, seq, ncols) -> (lines, rows, crc_sum, crc_xor, pos, seq)"},
    {"row", rowlines_row, METH_VARARGS, "row(payload, ncols) -> (line, crc)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowlines",
    "Chunk lines and their CRC-32 built from MySQL text-protocol row packets.", -1, methods,
};

PyMODINIT_FUNC PyInit__rowlines(void)
{
    escaped_as['\\'] = '\\';
    escaped_as['\t'] = '\t';
    escaped_as['\n'] = '\n';
    escaped_as[0] = '0';
#ifdef HAVE_FOLD
    __builtin_cpu_init();
    use_fold = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    if (getenv("SHARDVAULT_CRC_NO_FOLD") != NULL)
        use_fold = 0;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "FOLDED_CRC", use_fold) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
