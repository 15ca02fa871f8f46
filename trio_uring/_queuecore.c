/* The copy at the heart of send_all, and a slice's life, as a CPython type.
 *
 * QueueCore holds the fields of an outbound queue's tail (which slice,
 * where in the arena, how full) and the operations every queued byte goes
 * through: copy the caller's bytes into the tail and record them as a
 * queued segment, or (hold) record a bytes object by reference.  It counts
 * the bytes it copied, per queue and, through an optional shared int64,
 * for every queue of the arena: counting here costs nothing, where Python
 * counters cost every message two attribute updates.
 *
 * It also keeps the reference counts that gate a slice's reuse: taking the
 * next tail slice from the arena's free list, dropping a count when a
 * request or a plain send is done with a segment, and returning a slice to
 * the free list when its count reaches zero.  These run once per slice,
 * every few small messages, and in Python they were most of what a slice
 * cost.  Everything else about the queue (requests taking segments, requeueing
 * after a short send, reserve and commit) lives in the Python subclass
 * OutboundQueue (_queue.py).
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
    Py_ssize_t write_pos; /* where the last write() stopped, raising or not */
    Py_buffer total;      /* optional: one int64 that every queue adds its copies to */
    Py_ssize_t held;      /* slices this queue holds: tail, queued, or read in flight */
    Py_ssize_t limit;     /* the most slices it may hold (its share of the arena) */
    PyObject *free;       /* list: the arena's free slices, taken from the end */
    PyObject *on_free;    /* called when this queue may have gained room, or None */
} QueueCore;

static PyObject *str_append;
static PyObject *str_popleft;
static PyObject *str_unref;

static int
QueueCore_init(QueueCore *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"arena", "slice_size", "refs", "unsent", "free", "limit",
                             "copied_total", NULL};
    PyObject *arena, *refs, *unsent, *free, *total = Py_None;
    Py_ssize_t slice_size, limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnO!OO!n|O", kwlist, &arena, &slice_size,
                                     &PyList_Type, &refs, &unsent, &PyList_Type, &free, &limit,
                                     &total))
        return -1;
    if (slice_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "slice_size must be positive");
        return -1;
    }
    if (self->arena.obj != NULL)
        PyBuffer_Release(&self->arena);
    if (PyObject_GetBuffer(arena, &self->arena, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    /* Divided rather than multiplied: a product past PY_SSIZE_T_MAX would
     * wrap around and pass, and every slice offset computed from it after. */
    Py_ssize_t n_slices = PyList_GET_SIZE(refs);
    if (n_slices && slice_size > self->arena.len / n_slices) {
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
    self->write_pos = 0;
    self->tail = -1;
    self->tail_offset = 0;
    self->fill = 0;
    self->nbytes = 0;
    self->held = 0;
    self->limit = limit;
    Py_XSETREF(self->refs, Py_NewRef(refs));
    Py_XSETREF(self->unsent, Py_NewRef(unsent));
    Py_XSETREF(self->free, Py_NewRef(free));
    Py_XSETREF(self->on_free, Py_NewRef(Py_None));
    return 0;
}

static int
QueueCore_traverse(QueueCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->unsent);
    Py_VISIT(self->refs);
    Py_VISIT(self->free);
    Py_VISIT(self->on_free);
    /* The arena's buffer is not visited: nothing in it refers back to a
     * queue, and a collection must never release it while a queue lives. */
    return 0;
}

static int
QueueCore_clear(QueueCore *self)
{
    Py_CLEAR(self->unsent);
    Py_CLEAR(self->refs);
    Py_CLEAR(self->free);
    Py_CLEAR(self->on_free);
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

/* The result of a call made for its effect: -1 if the call raised, else 0. */
static int
discard(PyObject *result)
{
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* list[i] = value, for the lists of ints this code keeps: the slices'
 * counts and the segments' fields.  i must be in range. */
static int
set_int_item(PyObject *list, Py_ssize_t i, Py_ssize_t value)
{
    PyObject *v = PyLong_FromSsize_t(value);
    if (v == NULL)
        return -1;
    PyList_SetItem(list, i, v); /* steals v */
    return 0;
}

/* refs[slice], slice checked to lie in the arena; -1 with an exception set
 * (a count is never negative). */
static Py_ssize_t
ref_count(QueueCore *self, Py_ssize_t slice)
{
    if (self->refs == NULL || slice < 0 || slice >= PyList_GET_SIZE(self->refs)) {
        PyErr_SetString(PyExc_IndexError, "slice outside the arena");
        return -1;
    }
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(self->refs, slice));
    if (count < 0 && !PyErr_Occurred())
        PyErr_Format(PyExc_RuntimeError, "slice %zd has a negative count (%zd)", slice, count);
    return count < 0 ? -1 : count;
}

/* This queue may have gained room: tell on_free, if anyone listens. */
static int
notify_free(QueueCore *self)
{
    if (self->on_free == NULL || self->on_free == Py_None)
        return 0;
    return discard(PyObject_CallNoArgs(self->on_free));
}

/* The error being raised, taken out of the thread state, and raised again. */
#if PY_VERSION_HEX >= 0x030C0000
#define take_error PyErr_GetRaisedException
#define raise_error PyErr_SetRaisedException
#else
static PyObject *
take_error(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

static void
raise_error(PyObject *error)
{
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, PyException_GetTraceback(error));
}
#endif

/* Loops that drop many counts go on past an error, since a callback may
 * raise (on_free, registered content's unref): stopping there would leave
 * the counts after it never dropped, and the bytes a plain send took still
 * queued.  The first error is kept in *first, to be raised once the loop is
 * done (raise_kept); a later one is reported as unraisable. */
static void
keep_error(PyObject **first)
{
    if (*first == NULL)
        *first = take_error();
    else
        PyErr_WriteUnraisable(NULL);
}

/* None, or NULL with the kept error raised. */
static PyObject *
raise_kept(PyObject *error)
{
    if (error == NULL)
        Py_RETURN_NONE;
    raise_error(error); /* steals error */
    return NULL;
}

/* Drop one count of slice; at zero the slice goes back to the arena's
 * free list.  1: it went back, and the caller tells on_free once its own
 * fields are updated (a callback that raises must find them consistent);
 * 0: it is still counted; -1: an error, and nothing changed. */
static int
unref_slice(QueueCore *self, Py_ssize_t slice)
{
    Py_ssize_t count = ref_count(self, slice);
    if (count < 0)
        return -1;
    if (count == 0) {
        PyErr_Format(PyExc_RuntimeError, "slice %zd released more often than it was counted",
                     slice);
        return -1;
    }
    if (count > 1)
        return set_int_item(self->refs, slice, count - 1);
    /* The last count.  What can fail (the objects, the free list growing)
     * comes first: a slice whose count is zero but that is not on the free
     * list would never be handed out again. */
    PyObject *id = PyLong_FromSsize_t(slice);
    PyObject *zero = PyLong_FromSsize_t(0);
    int rc = id == NULL || zero == NULL ? -1 : PyList_Append(self->free, id);
    Py_XDECREF(id);
    if (rc < 0) {
        Py_XDECREF(zero);
        return -1;
    }
    PyList_SetItem(self->refs, slice, zero); /* steals zero; ref_count checked slice */
    self->held -= 1;
    return 1;
}

/* A segment's owner is done with: a slice id (a count), registered content
 * (its own count), or a caller's bytes held by reference (nothing). */
static int
unref_owner(QueueCore *self, PyObject *owner)
{
    if (PyLong_CheckExact(owner)) {
        Py_ssize_t slice = PyLong_AsSsize_t(owner);
        if (slice == -1 && PyErr_Occurred())
            return -1;
        int rc = unref_slice(self, slice);
        return rc > 0 ? notify_free(self) : rc;
    }
    if (PyBytes_CheckExact(owner))
        return 0;
    return discard(PyObject_CallMethodNoArgs(owner, str_unref));
}

/* Nothing is queued and nothing but the tail role counts the tail: return it,
 * so that an idle stream holds no slice. */
static int
drop_idle_tail(QueueCore *self)
{
    Py_ssize_t tail = self->tail;
    if (tail < 0 || self->nbytes)
        return 0;
    Py_ssize_t count = ref_count(self, tail);
    if (count < 0)
        return -1;
    if (count != 1)
        return 0;
    if (unref_slice(self, tail) < 0)
        return -1;
    self->tail = -1;
    self->fill = 0;
    return notify_free(self);
}

/* Drop the full tail and make the free slice taken last the tail, if this
 * queue is under its limit and the arena has a free slice.  1: done; 0: no
 * slice may be taken now; -1: error. */
static int
new_tail(QueueCore *self)
{
    if (self->tail >= 0) {
        int rc = unref_slice(self, self->tail);
        if (rc < 0)
            return -1;
        self->tail = -1;
        if (rc && notify_free(self) < 0)
            return -1;
    }
    if (self->held >= self->limit)
        return 0;
    if (self->free == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue was not initialised");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(self->free);
    if (!n)
        return 0;
    Py_ssize_t granted = PyLong_AsSsize_t(PyList_GET_ITEM(self->free, n - 1));
    if (granted == -1 && PyErr_Occurred())
        return -1;
    if (PyList_SetSlice(self->free, n - 1, n, NULL) < 0)
        return -1;
    if (ref_count(self, granted) < 0 || set_int_item(self->refs, granted, 1) < 0)
        return -1;
    self->held += 1;
    self->tail = granted;
    self->tail_offset = granted * self->slice_size;
    self->fill = 0;
    return 1;
}

static PyObject *
QueueCore_new_tail(QueueCore *self, PyObject *Py_UNUSED(ignored))
{
    int ok = new_tail(self);
    if (ok < 0)
        return NULL;
    return PyBool_FromLong(ok);
}

static PyObject *
QueueCore_unref(QueueCore *self, PyObject *owner)
{
    if (unref_owner(self, owner) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
QueueCore_drop_idle_tail(QueueCore *self, PyObject *Py_UNUSED(ignored))
{
    if (drop_idle_tail(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A segment's field as a Py_ssize_t (segments are [offset, length, owner]). */
static int
segment_field(PyObject *segment, Py_ssize_t i, Py_ssize_t *out)
{
    if (!PyList_CheckExact(segment) || PyList_GET_SIZE(segment) != 3) {
        PyErr_SetString(PyExc_TypeError, "a queued segment is a list [offset, length, owner]");
        return -1;
    }
    *out = PyLong_AsSsize_t(PyList_GET_ITEM(segment, i));
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

static PyObject *
QueueCore_consume(QueueCore *self, PyObject *arg)
{
    Py_ssize_t nbytes = PyLong_AsSsize_t(arg);
    if (nbytes == -1 && PyErr_Occurred())
        return NULL;
    if (nbytes < 0 || nbytes > self->nbytes) {
        PyErr_SetString(PyExc_ValueError, "consume() of more bytes than are queued");
        return NULL;
    }
    self->nbytes -= nbytes;
    PyObject *error = NULL;
    while (nbytes) {
        PyObject *segment = PySequence_GetItem(self->unsent, 0);
        if (segment == NULL)
            goto failed;
        Py_ssize_t offset, length;
        if (segment_field(segment, 0, &offset) < 0 || segment_field(segment, 1, &length) < 0) {
            Py_DECREF(segment);
            goto failed;
        }
        if (length > nbytes) {
            int rc = set_int_item(segment, 0, offset + nbytes);
            if (rc == 0)
                rc = set_int_item(segment, 1, length - nbytes);
            Py_DECREF(segment);
            if (rc < 0)
                goto failed;
            break;
        }
        nbytes -= length;
        if (discard(PyObject_CallMethodNoArgs(self->unsent, str_popleft)) < 0) {
            Py_DECREF(segment);
            goto failed;
        }
        if (unref_owner(self, PyList_GET_ITEM(segment, 2)) < 0)
            keep_error(&error);
        Py_DECREF(segment);
    }
    if (drop_idle_tail(self) < 0)
        keep_error(&error);
    return raise_kept(error);
failed:
    keep_error(&error);
    return raise_kept(error);
}

static PyObject *
QueueCore_release(QueueCore *self, PyObject *segments)
{
    PyObject *it = PyObject_GetIter(segments);
    if (it == NULL)
        return NULL;
    PyObject *error = NULL;
    PyObject *segment;
    while ((segment = PyIter_Next(it)) != NULL) {
        int rc = -1;
        if (PyList_CheckExact(segment) && PyList_GET_SIZE(segment) == 3)
            rc = unref_owner(self, PyList_GET_ITEM(segment, 2));
        else
            PyErr_SetString(PyExc_TypeError,
                            "a queued segment is a list [offset, length, owner]");
        Py_DECREF(segment);
        if (rc < 0)
            keep_error(&error);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        keep_error(&error);
    if (drop_idle_tail(self) < 0 || notify_free(self) < 0)
        keep_error(&error);
    return raise_kept(error);
}

/* Record nbytes just written at the tail's fill point: they extend the
 * last queued segment when it ends there in the same slice, else they
 * become a segment of their own, which counts the tail once more.  Bytes
 * that do not fit in the tail, or a queue without one, are refused before
 * anything changes. */
static int
append_segment(QueueCore *self, Py_ssize_t nbytes)
{
    if (self->unsent == NULL || self->refs == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue has no segment list");
        return -1;
    }
    if (self->tail < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the queue has no tail slice to append to");
        return -1;
    }
    if (nbytes < 0 || nbytes > self->slice_size - self->fill) {
        PyErr_Format(PyExc_ValueError, "%zd bytes do not lie in the tail slice after its %zd bytes",
                     nbytes, self->fill);
        return -1;
    }
    Py_ssize_t start = self->tail_offset + self->fill;
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
                int rc = set_int_item(last, 1, length + nbytes);
                Py_DECREF(last);
                if (rc < 0)
                    return -1;
                goto done;
            }
        }
        Py_DECREF(last);
    }
    /* A segment of its own counts the tail once more.  The new count is
     * made before the segment is queued and stored after it, so that a
     * MemoryError leaves neither: a segment that its slice does not count
     * would let the slice be handed out again while the segment names it. */
    Py_ssize_t count = ref_count(self, self->tail);
    if (count < 0)
        return -1;
    PyObject *counted = PyLong_FromSsize_t(count + 1);
    if (counted == NULL)
        return -1;
    PyObject *segment = Py_BuildValue("[nnn]", start, nbytes, self->tail);
    int appended = segment == NULL
                       ? -1
                       : discard(PyObject_CallMethodOneArg(self->unsent, str_append, segment));
    Py_XDECREF(segment);
    if (appended < 0) {
        Py_DECREF(counted);
        return -1;
    }
    if (PyList_SetItem(self->refs, self->tail, counted) < 0) /* steals counted */
        return -1;
done:
    self->fill += nbytes;
    self->nbytes += nbytes;
    return 0;
}

static PyObject *
QueueCore_append(QueueCore *self, PyObject *arg)
{
    Py_ssize_t nbytes = PyLong_AsSsize_t(arg);
    if (nbytes == -1 && PyErr_Occurred())
        return NULL;
    if (append_segment(self, nbytes) < 0)
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
    /* Each slice's worth is queued whole (copy, segment, counts) or not at
     * all, and write_pos follows: when a later one fails (MemoryError), the
     * caller learns from it how much of the call was queued. */
    self->write_pos = pos;
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
        if (self->tail < 0 || self->fill >= self->slice_size) {
            int ok = new_tail(self);
            if (ok < 0)
                goto error;
            if (!ok)
                break;
        }
        /* tail_offset and fill can be set from Python: the range they name
         * is checked without a sum that could wrap around past
         * PY_SSIZE_T_MAX and pass. */
        Py_ssize_t offset = self->tail_offset, fill = self->fill;
        if (offset < 0 || fill < 0 || offset > self->arena.len - fill) {
            PyErr_SetString(PyExc_IndexError, "tail outside the arena");
            goto error;
        }
        Py_ssize_t start = offset + fill;
        Py_ssize_t n = self->slice_size - fill;
        if (n > total - pos)
            n = total - pos;
        if (n > self->arena.len - start) {
            PyErr_SetString(PyExc_IndexError, "tail outside the arena");
            goto error;
        }
        memcpy(base + start, (char *)data.buf + pos, (size_t)n);
        if (append_segment(self, n) < 0)
            goto error;
        pos += n;
        self->write_pos = pos;
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
    int appended = discard(PyObject_CallMethodOneArg(self->unsent, str_append, segment));
    Py_DECREF(segment);
    if (appended < 0)
        return NULL;
    self->nbytes += n;
    Py_RETURN_NONE;
}

/* The bytes a segment names: the held bytes object itself when the segment
 * is all of it, else a memoryview slice of its owner (the arena, or held
 * bytes). */
static PyObject *
QueueCore_segment_view(QueueCore *self, PyObject *segment)
{
    Py_ssize_t offset, length;
    if (segment_field(segment, 0, &offset) < 0 || segment_field(segment, 1, &length) < 0)
        return NULL;
    PyObject *owner = PyList_GET_ITEM(segment, 2);
    if (!PyBytes_CheckExact(owner))
        return PySequence_GetSlice(self->arena.obj, offset, offset + length);
    if (offset == 0 && length == PyBytes_GET_SIZE(owner))
        return Py_NewRef(owner);
    PyObject *whole = PyMemoryView_FromObject(owner);
    if (whole == NULL)
        return NULL;
    PyObject *part = PySequence_GetSlice(whole, offset, offset + length);
    Py_DECREF(whole);
    return part;
}

/* The bytes of the first max_segments queued segments, for one plain
 * sendmsg(): a Python call per segment was a tenth of a held message's
 * send_all. */
static PyObject *
QueueCore_views(QueueCore *self, PyObject *arg)
{
    Py_ssize_t max_segments = PyLong_AsSsize_t(arg);
    if (max_segments == -1 && PyErr_Occurred())
        return NULL;
    if (self->unsent == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue has no segment list");
        return NULL;
    }
    PyObject *views = PyList_New(0);
    if (views == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(self->unsent);
    if (it == NULL) {
        Py_DECREF(views);
        return NULL;
    }
    PyObject *segment;
    while (PyList_GET_SIZE(views) < max_segments && (segment = PyIter_Next(it)) != NULL) {
        PyObject *view = QueueCore_segment_view(self, segment);
        Py_DECREF(segment);
        if (view == NULL || PyList_Append(views, view) < 0) {
            Py_XDECREF(view);
            Py_DECREF(it);
            Py_DECREF(views);
            return NULL;
        }
        Py_DECREF(view);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        Py_DECREF(views);
        return NULL;
    }
    return views;
}

static PyMethodDef QueueCore_methods[] = {
    {"write", (PyCFunction)(void (*)(void))QueueCore_write, METH_FASTCALL,
     "write(data, pos=0) -> int\n\nCopy data[pos:] into the queue as far as it fits without "
     "waiting for a slice; return the position reached.  If it raises, write_pos is the "
     "position reached: data[pos:write_pos] is queued."},
    {"_append", (PyCFunction)QueueCore_append, METH_O,
     "_append(nbytes)\n\nQueue nbytes just written at the tail's fill point."},
    {"hold", (PyCFunction)QueueCore_hold, METH_O,
     "hold(data)\n\nQueue a bytes object by reference: no copy, no slice."},
    {"segment_view", (PyCFunction)QueueCore_segment_view, METH_O,
     "segment_view(segment) -> bytes | memoryview\n\nThe bytes a queued segment names."},
    {"views", (PyCFunction)QueueCore_views, METH_O,
     "views(max_segments) -> list\n\nThe bytes of the first max_segments queued segments, "
     "for a plain sendmsg()."},
    {"_new_tail", (PyCFunction)QueueCore_new_tail, METH_NOARGS,
     "_new_tail() -> bool\n\nDrop the full tail and make a free slice the tail; False if "
     "no slice may be taken now."},
    {"unref", (PyCFunction)QueueCore_unref, METH_O,
     "unref(owner)\n\nDrop one count of a segment's owner; a slice whose count reaches zero "
     "goes back to the arena."},
    {"_drop_idle_tail", (PyCFunction)QueueCore_drop_idle_tail, METH_NOARGS,
     "_drop_idle_tail()\n\nNothing is queued and nothing reads the tail: return it."},
    {"consume", (PyCFunction)QueueCore_consume, METH_O,
     "consume(nbytes)\n\nThe first nbytes queued bytes were copied by the kernel (a plain "
     "send): drop them, releasing slices nothing else reads."},
    {"release", (PyCFunction)QueueCore_release, METH_O,
     "release(segments)\n\nA request that read segments is done with them."},
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
    {"write_pos", T_PYSSIZET, offsetof(QueueCore, write_pos), READONLY, NULL},
    {"held", T_PYSSIZET, offsetof(QueueCore, held), 0, NULL},
    {"limit", T_PYSSIZET, offsetof(QueueCore, limit), READONLY, NULL},
    {"on_free", T_OBJECT, offsetof(QueueCore, on_free), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject QueueCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trio_uring._queuecore.QueueCore",
    .tp_basicsize = sizeof(QueueCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The tail of an outbound queue, the copy into it and its slices' reference "
               "counts (see _queue.OutboundQueue).",
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
    .m_doc = "The outbound queue's copy into registered memory and its slices' counts "
              "(see _queue.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__queuecore(void)
{
    str_append = PyUnicode_InternFromString("append");
    str_popleft = PyUnicode_InternFromString("popleft");
    str_unref = PyUnicode_InternFromString("unref");
    if (str_append == NULL || str_popleft == NULL || str_unref == NULL)
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
