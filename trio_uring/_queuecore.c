/* The copy at the heart of send_all, as a CPython type.
 *
 * QueueCore holds the fields of an outbound queue's tail (which slice,
 * where in the arena, how full) and the operations every queued byte goes
 * through: copy the caller's bytes into the tail and record them as a
 * queued segment, or (hold) record a bytes object by reference.  It counts
 * the bytes it copied, per queue and, through an optional shared int64,
 * for every queue of the arena: counting here costs nothing, where Python
 * counters cost every message two attribute updates.  Everything else
 * about the queue (which slice to take next, reference counts dropped by
 * requests, requeueing after a short send) is policy, and lives in the
 * Python subclass OutboundQueue (_queue.py), which this code calls back
 * only for the next slice (_new_tail).
 *
 * Written against the CPython API rather than the cffi shim because a cffi
 * call costs a few thousand instructions, as much as the Python it would
 * replace; a method of a C type costs a few hundred.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    Py_buffer arena;      /* the registered arena, held for the queue's life */
    Py_ssize_t slice_size;
    Py_ssize_t tail;      /* the slice small messages are appended to, -1: none */
    Py_ssize_t tail_offset;
    Py_ssize_t fill;      /* bytes used in the tail */
    Py_ssize_t nbytes;    /* bytes queued and not yet taken by a request */
    PyObject *unsent;     /* collections.deque of [offset, length, owner] */
    PyObject *refs;       /* list: references to each slice (the arena's) */
    long long copied;     /* bytes write() copied into the arena */
    Py_buffer total;      /* optional: one int64 that every queue adds its copies to */
} QueueCore;

static PyObject *str_new_tail;
static PyObject *str_append;

static int
QueueCore_init(QueueCore *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"arena", "slice_size", "refs", "unsent", "copied_total", NULL};
    PyObject *arena, *refs, *unsent, *total = Py_None;
    Py_ssize_t slice_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnO!O|O", kwlist, &arena, &slice_size,
                                     &PyList_Type, &refs, &unsent, &total))
        return -1;
    if (slice_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "slice_size must be positive");
        return -1;
    }
    if (self->arena.obj != NULL)
        PyBuffer_Release(&self->arena);
    if (PyObject_GetBuffer(arena, &self->arena, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyList_GET_SIZE(refs) * slice_size > self->arena.len) {
        PyBuffer_Release(&self->arena);
        PyErr_SetString(PyExc_ValueError, "the arena is smaller than its slices");
        return -1;
    }
    if (self->total.obj != NULL)
        PyBuffer_Release(&self->total);
    if (total != Py_None) {
        if (PyObject_GetBuffer(total, &self->total, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&self->arena);
            return -1;
        }
        if (self->total.len < (Py_ssize_t)sizeof(long long)) {
            PyBuffer_Release(&self->total);
            PyBuffer_Release(&self->arena);
            PyErr_SetString(PyExc_ValueError, "copied_total must hold one 64-bit integer");
            return -1;
        }
    }
    self->slice_size = slice_size;
    self->copied = 0;
    self->tail = -1;
    self->tail_offset = 0;
    self->fill = 0;
    self->nbytes = 0;
    Py_INCREF(refs);
    Py_XSETREF(self->refs, refs);
    Py_INCREF(unsent);
    Py_XSETREF(self->unsent, unsent);
    return 0;
}

static int
QueueCore_traverse(QueueCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->unsent);
    Py_VISIT(self->refs);
    /* The arena's buffer is not visited: nothing in it refers back to a
     * queue, and a collection must never release it while a queue lives. */
    return 0;
}

static int
QueueCore_clear(QueueCore *self)
{
    Py_CLEAR(self->unsent);
    Py_CLEAR(self->refs);
    return 0;
}

static void
QueueCore_dealloc(QueueCore *self)
{
    PyObject_GC_UnTrack(self);
    QueueCore_clear(self);
    if (self->arena.obj != NULL)
        PyBuffer_Release(&self->arena);
    if (self->total.obj != NULL)
        PyBuffer_Release(&self->total);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* refs[slice] += 1 */
static int
add_ref(QueueCore *self, Py_ssize_t slice)
{
    if (slice < 0 || slice >= PyList_GET_SIZE(self->refs)) {
        PyErr_SetString(PyExc_IndexError, "tail slice outside the arena");
        return -1;
    }
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(self->refs, slice));
    if (count == -1 && PyErr_Occurred())
        return -1;
    PyObject *value = PyLong_FromSsize_t(count + 1);
    if (value == NULL)
        return -1;
    PyList_SetItem(self->refs, slice, value); /* steals value */
    return 0;
}

/* Record nbytes just written at start, the tail's fill point: they extend
 * the last queued segment when it ends there in the same slice, else they
 * become a segment of their own, which counts the tail once more. */
static int
append_segment(QueueCore *self, Py_ssize_t start, Py_ssize_t nbytes)
{
    if (self->unsent == NULL || self->refs == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue has no segment list");
        return -1;
    }
    Py_ssize_t queued = PyObject_Length(self->unsent);
    if (queued < 0)
        return -1;
    if (queued) {
        PyObject *last = PySequence_GetItem(self->unsent, queued - 1);
        if (last == NULL)
            return -1;
        if (PyList_CheckExact(last) && PyList_GET_SIZE(last) == 3
            && PyLong_CheckExact(PyList_GET_ITEM(last, 2))) {
            Py_ssize_t owner = PyLong_AsSsize_t(PyList_GET_ITEM(last, 2));
            Py_ssize_t offset = PyLong_AsSsize_t(PyList_GET_ITEM(last, 0));
            Py_ssize_t length = PyLong_AsSsize_t(PyList_GET_ITEM(last, 1));
            if (PyErr_Occurred()) {
                Py_DECREF(last);
                return -1;
            }
            if (owner == self->tail && offset + length == start) {
                PyObject *value = PyLong_FromSsize_t(length + nbytes);
                if (value == NULL) {
                    Py_DECREF(last);
                    return -1;
                }
                PyList_SetItem(last, 1, value); /* steals value */
                Py_DECREF(last);
                goto done;
            }
        }
        Py_DECREF(last);
    }
    PyObject *segment = Py_BuildValue("[nnn]", start, nbytes, self->tail);
    if (segment == NULL)
        return -1;
    PyObject *rc = PyObject_CallMethodOneArg(self->unsent, str_append, segment);
    Py_DECREF(segment);
    if (rc == NULL)
        return -1;
    Py_DECREF(rc);
    if (add_ref(self, self->tail) < 0)
        return -1;
done:
    self->fill += nbytes;
    self->nbytes += nbytes;
    return 0;
}

static PyObject *
QueueCore_append(QueueCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_append(start, nbytes) takes two arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]);
    Py_ssize_t nbytes = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (append_segment(self, start, nbytes) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
QueueCore_write(QueueCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "write(data, pos=0) takes one or two arguments");
        return NULL;
    }
    Py_ssize_t pos = 0;
    if (nargs == 2) {
        pos = PyLong_AsSsize_t(args[1]);
        if (pos == -1 && PyErr_Occurred())
            return NULL;
    }
    if (self->arena.obj == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue was not initialised");
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t total = data.len;
    if (pos < 0 || pos > total) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "write position outside the data");
        return NULL;
    }
    char *base = self->arena.buf;
    while (pos < total) {
        if (self->tail < 0 || self->fill == self->slice_size) {
            /* Which slice comes next is the Python subclass's decision. */
            PyObject *got = PyObject_CallMethodNoArgs((PyObject *)self, str_new_tail);
            if (got == NULL)
                goto error;
            int ok = PyObject_IsTrue(got);
            Py_DECREF(got);
            if (ok < 0)
                goto error;
            if (!ok)
                break;
            if (self->tail < 0 || self->fill == self->slice_size) {
                PyErr_SetString(PyExc_RuntimeError, "_new_tail() gave no room");
                goto error;
            }
        }
        Py_ssize_t n = self->slice_size - self->fill;
        if (n > total - pos)
            n = total - pos;
        Py_ssize_t start = self->tail_offset + self->fill;
        if (start < 0 || start + n > self->arena.len) {
            PyErr_SetString(PyExc_IndexError, "tail outside the arena");
            goto error;
        }
        memcpy(base + start, (char *)data.buf + pos, (size_t)n);
        if (append_segment(self, start, n) < 0)
            goto error;
        pos += n;
        self->copied += n;
        if (self->total.obj != NULL) {
            long long sum;
            memcpy(&sum, self->total.buf, sizeof sum);
            sum += n;
            memcpy(self->total.buf, &sum, sizeof sum);
        }
    }
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(pos);
error:
    PyBuffer_Release(&data);
    return NULL;
}

/* Queue a caller's bytes object by reference: [0, len, data] at the end. */
static PyObject *
QueueCore_hold(QueueCore *self, PyObject *data)
{
    if (!PyBytes_CheckExact(data)) {
        PyErr_Format(PyExc_TypeError, "hold() takes bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (self->unsent == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue has no segment list");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    PyObject *segment = Py_BuildValue("[nnO]", (Py_ssize_t)0, n, data);
    if (segment == NULL)
        return NULL;
    PyObject *rc = PyObject_CallMethodOneArg(self->unsent, str_append, segment);
    Py_DECREF(segment);
    if (rc == NULL)
        return NULL;
    Py_DECREF(rc);
    self->nbytes += n;
    Py_RETURN_NONE;
}

static PyMethodDef QueueCore_methods[] = {
    {"write", (PyCFunction)(void (*)(void))QueueCore_write, METH_FASTCALL,
     "write(data, pos=0) -> int\n\nCopy data[pos:] into the queue as far as it fits without "
     "waiting for a slice; return the position reached."},
    {"_append", (PyCFunction)(void (*)(void))QueueCore_append, METH_FASTCALL,
     "_append(start, nbytes)\n\nQueue nbytes just written at start, the tail's fill point."},
    {"hold", (PyCFunction)QueueCore_hold, METH_O,
     "hold(data)\n\nQueue a bytes object by reference: no copy, no slice."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef QueueCore_members[] = {
    {"slice_size", T_PYSSIZET, offsetof(QueueCore, slice_size), READONLY, NULL},
    {"tail", T_PYSSIZET, offsetof(QueueCore, tail), 0, NULL},
    {"tail_offset", T_PYSSIZET, offsetof(QueueCore, tail_offset), 0, NULL},
    {"fill", T_PYSSIZET, offsetof(QueueCore, fill), 0, NULL},
    {"nbytes", T_PYSSIZET, offsetof(QueueCore, nbytes), 0, NULL},
    {"unsent", T_OBJECT_EX, offsetof(QueueCore, unsent), 0, NULL},
    {"refs", T_OBJECT_EX, offsetof(QueueCore, refs), READONLY, NULL},
    {"copied", T_LONGLONG, offsetof(QueueCore, copied), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject QueueCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trio_uring._queuecore.QueueCore",
    .tp_basicsize = sizeof(QueueCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The tail of an outbound queue and the copy into it (see _queue.OutboundQueue).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)QueueCore_init,
    .tp_dealloc = (destructor)QueueCore_dealloc,
    .tp_traverse = (traverseproc)QueueCore_traverse,
    .tp_clear = (inquiry)QueueCore_clear,
    .tp_methods = QueueCore_methods,
    .tp_members = QueueCore_members,
};

static struct PyModuleDef queuecore_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "trio_uring._queuecore",
    .m_doc = "The outbound queue's copy into registered memory (see _queue.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__queuecore(void)
{
    str_new_tail = PyUnicode_InternFromString("_new_tail");
    str_append = PyUnicode_InternFromString("append");
    if (str_new_tail == NULL || str_append == NULL)
        return NULL;
    if (PyType_Ready(&QueueCoreType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&queuecore_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&QueueCoreType);
    if (PyModule_AddObject(module, "QueueCore", (PyObject *)&QueueCoreType) < 0) {
        Py_DECREF(&QueueCoreType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
