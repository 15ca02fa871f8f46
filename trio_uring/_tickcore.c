/*
 * The scheduler tick's count and the check that runs at the end of every
 * tick: does any stream waiting for the tick's flush need it now?
 *
 * The manager hooks trio's before_io_wait, which runs once per scheduler
 * tick.  In a producer's full flow that is once per message, and on almost
 * every one of those ticks every waiting stream is held for more messages
 * (each stream decides that as it queues: its hold_tick, see
 * ZeroCopyStream._queued).  As a Python method the hook cost a frame and
 * some forty opcodes per message for that answer; as a method of this type
 * it costs a C call.  Whenever some stream is not held, it calls the
 * manager's flush (IOManager.flush_tick, Python), which does the work and
 * holds the policy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    /* int: ticks ended so far, the number of the current one.  Every
     * send_all reads it; an object member is one the interpreter's
     * specialised attribute load reads directly, where a C integer member
     * costs a generic lookup and a new int per read (about 27 ns against
     * 7 ns on the machines measured).  One int is made per tick instead. */
    PyObject *tick;
    PyObject *pending;    /* list: streams whose queues wait for a tick's flush */
    PyObject *flush;      /* flush(tick, timeout): the manager's flush of a tick */
} Ticker;

static PyObject *str_hold_tick;

static int
Ticker_init(Ticker *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"flush", NULL};
    PyObject *flush;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Ticker", kwlist, &flush))
        return -1;
    if (!PyCallable_Check(flush)) {
        PyErr_SetString(PyExc_TypeError, "Ticker(flush): flush must be callable");
        return -1;
    }
    PyObject *pending = PyList_New(0);
    if (pending == NULL)
        return -1;
    Py_XSETREF(self->pending, pending);
    Py_XSETREF(self->flush, Py_NewRef(flush));
    Py_XSETREF(self->tick, PyLong_FromSsize_t(0));
    if (self->tick == NULL)
        return -1;
    return 0;
}

/* Whether every stream in pending is held at the end of tick ``hold``:
 * 1 yes, 0 no, -1 error.  The caller holds a reference to pending; each
 * stream is held while its attribute is read, which may run Python code. */
static int
all_held(PyObject *pending, Py_ssize_t hold)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pending); i++) {
        PyObject *stream = Py_NewRef(PyList_GET_ITEM(pending, i));
        PyObject *value = PyObject_GetAttr(stream, str_hold_tick);
        Py_DECREF(stream);
        if (value == NULL)
            return -1;
        Py_ssize_t stream_hold = PyLong_AsSsize_t(value);
        Py_DECREF(value);
        if (stream_hold == -1 && PyErr_Occurred())
            return -1;
        if (stream_hold != hold)
            return 0;
    }
    return 1;
}

static PyObject *
Ticker_before_io_wait(Ticker *self, PyObject *timeout)
{
    if (self->pending == NULL || self->flush == NULL || self->tick == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ticker.__init__ was not called");
        return NULL;
    }
    if (!PyLong_CheckExact(self->tick)) {
        PyErr_SetString(PyExc_TypeError, "Ticker.tick must be an int");
        return NULL;
    }
    Py_ssize_t tick = PyLong_AsSsize_t(self->tick);
    if (tick == -1 && PyErr_Occurred())
        return NULL;
    if (tick == PY_SSIZE_T_MAX) { /* tick + 1 would wrap around */
        PyErr_SetString(PyExc_OverflowError, "Ticker.tick cannot count past sys.maxsize");
        return NULL;
    }
    PyObject *next = PyLong_FromSsize_t(tick + 1);
    if (next == NULL)
        return NULL;
    Py_SETREF(self->tick, next);
    if (PyList_GET_SIZE(self->pending) == 0)
        Py_RETURN_NONE;
    /* About to sleep: nothing is held (no stream's hold_tick is -1).  When
     * the check fails (it reads the ints the streams keep, so only for an
     * object that is not a stream), the flush runs and decides in Python,
     * where a stream whose flush fails is failed: trio drops an instrument
     * whose hook raises, and with it every later tick's flush. */
    PyObject *pending = Py_NewRef(self->pending);
    double seconds = PyFloat_AsDouble(timeout);
    int held = -1;
    if (!(seconds == -1.0 && PyErr_Occurred()))
        held = all_held(pending, seconds <= 0 ? tick : -1);
    Py_DECREF(pending);
    if (held == 1)
        Py_RETURN_NONE;
    if (held < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* KeyboardInterrupt and the like are not ours to drop */
        PyErr_Clear();
    }
    PyObject *number = PyLong_FromSsize_t(tick);
    if (number == NULL)
        return NULL;
    PyObject *result = PyObject_CallFunctionObjArgs(self->flush, number, timeout, NULL);
    Py_DECREF(number);
    return result;
}

static int
Ticker_set_pending(Ticker *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyList_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "Ticker.pending must be a list");
        return -1;
    }
    Py_XSETREF(self->pending, Py_NewRef(value));
    return 0;
}

static PyObject *
Ticker_get_pending(Ticker *self, void *Py_UNUSED(closure))
{
    if (self->pending == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ticker.__init__ was not called");
        return NULL;
    }
    return Py_NewRef(self->pending);
}

static int
Ticker_traverse(Ticker *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pending);
    Py_VISIT(self->flush);
    Py_VISIT(self->tick);
    return 0;
}

static int
Ticker_clear(Ticker *self)
{
    Py_CLEAR(self->pending);
    Py_CLEAR(self->flush);
    Py_CLEAR(self->tick);
    return 0;
}

static void
Ticker_dealloc(Ticker *self)
{
    PyObject_GC_UnTrack(self);
    Ticker_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Ticker_methods[] = {
    {"before_io_wait", (PyCFunction)Ticker_before_io_wait, METH_O,
     "before_io_wait(timeout)\n\nEnd the current tick: count it, and call flush(tick, timeout) "
     "unless every pending stream is held (its hold_tick is this tick, and timeout <= 0)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Ticker_members[] = {
    {"tick", T_OBJECT_EX, offsetof(Ticker, tick), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Ticker_getset[] = {
    {"pending", (getter)Ticker_get_pending, (setter)Ticker_set_pending,
     "Streams whose queues wait for a tick's flush (a list).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TickerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trio_uring._tickcore.Ticker",
    .tp_basicsize = sizeof(Ticker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Counts trio's scheduler ticks and calls the manager's flush at the end of a "
              "tick in which some pending stream is not held.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ticker_init,
    .tp_dealloc = (destructor)Ticker_dealloc,
    .tp_traverse = (traverseproc)Ticker_traverse,
    .tp_clear = (inquiry)Ticker_clear,
    .tp_methods = Ticker_methods,
    .tp_members = Ticker_members,
    .tp_getset = Ticker_getset,
};

static struct PyModuleDef tickcore_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "trio_uring._tickcore",
    .m_doc = "The scheduler tick's count and the end-of-tick check of the flush "
              "(see _manager.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__tickcore(void)
{
    str_hold_tick = PyUnicode_InternFromString("hold_tick");
    if (str_hold_tick == NULL)
        return NULL;
    if (PyType_Ready(&TickerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&tickcore_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&TickerType);
    if (PyModule_AddObject(module, "Ticker", (PyObject *)&TickerType) < 0) {
        Py_DECREF(&TickerType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
