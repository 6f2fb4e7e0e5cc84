/*
 * _kvblend.c: the CPython extension over libkvblend (module kvblend._kvblend).
 *
 * A thin, torch-free layer: tensors arrive as integers (data_ptr()), sizes,
 * dtype codes and a CUDA stream handle; token sequences as Python sequences
 * or integer buffers.  Every C status is turned into a kvblend exception by
 * one function, set_error_from_status().  The GIL is released around every
 * call into libkvblend that may take a lock, start threads or log, because
 * the log sink re-enters Python (PyGILState_Ensure) from any thread.
 *
 * Built with multi-phase initialisation: exceptions and the heap types
 * (Connector, Request, Layout) live in the module state, never in static
 * globals.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"
#include "structmember.h" /* T_* member types (Python 3.11) */

/* ------------------------------------------------------------------------ */
/* Module state and errors                                                   */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject *error;            /* kvblend.Error(Exception) */
    PyObject *invalid_error;    /* (Error, ValueError) */
    PyObject *nomem_error;      /* (Error, MemoryError) */
    PyObject *unsupported_error;/* (Error, NotImplementedError) */
    PyObject *cuda_error;       /* (Error, RuntimeError) */
    PyObject *notfound_error;   /* (Error, LookupError) */
    PyObject *internal_error;   /* (Error, RuntimeError) */
    PyTypeObject *connector_type;
    PyTypeObject *request_type;
    PyTypeObject *layout_type;
} module_state;

static struct PyModuleDef kvblend_module;

/* Returns the state of the module `m` (never NULL for this module). */
static inline module_state *get_state(PyObject *m)
{
    return (module_state *)PyModule_GetState(m);
}

/* Returns the module state reached from an instance of one of this
 * module's heap types.  The types are not subclassable, so Py_TYPE(self) is
 * always the type created in module exec. */
static inline module_state *state_of(PyObject *self)
{
    return (module_state *)PyType_GetModuleState(Py_TYPE(self));
}

/*
 * Raises the kvblend exception that matches `status`, with this thread's
 * kvb_last_error() as the message (kvb_status_str() when it is empty).
 * Must be called on the thread that made the failing call.  Always returns
 * NULL so callers can `return set_error_from_status(...)`.
 */
static PyObject *set_error_from_status(module_state *st, kvb_status status)
{
    PyObject *exc;
    switch (status) {
    case KVB_ERR_INVALID:
        exc = st->invalid_error;
        break;
    case KVB_ERR_NOMEM:
        exc = st->nomem_error;
        break;
    case KVB_ERR_UNSUPPORTED:
        exc = st->unsupported_error;
        break;
    case KVB_ERR_CUDA:
        exc = st->cuda_error;
        break;
    case KVB_ERR_NOT_FOUND:
        exc = st->notfound_error;
        break;
    case KVB_ERR_INTERNAL:
        exc = st->internal_error;
        break;
    default:
        exc = st->error;
        break;
    }
    const char *msg = kvb_last_error();
    if (msg == NULL || msg[0] == '\0') {
        msg = kvb_status_str(status);
    }
    PyErr_SetString(exc, msg);
    return NULL;
}

/* Raises kvblend.InvalidError (a ValueError) with a formatted message for
 * bad input detected in the shim itself; returns NULL. */
static PyObject *raise_invalid(module_state *st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL) {
        PyErr_SetObject(st->invalid_error, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Logging: C log lines go to logging.getLogger("kvblend")                   */
/* ------------------------------------------------------------------------ */

/* Reports whether the interpreter is shutting down, when calling into
 * Python is no longer safe. */
static int interpreter_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/*
 * The log sink installed in libkvblend.  Called from any thread, with or
 * without the GIL: takes the GIL with PyGILState_Ensure, preserves any
 * pending exception of that thread and calls logger.log(level, msg).
 * Errors raised by handlers are reported as unraisable, never propagated.
 * While the interpreter finalizes, WARNING and above go to stderr instead.
 */
static void log_sink(kvb_log_level level, const char *msg, void *user)
{
    (void)user;
    if (!Py_IsInitialized() || interpreter_finalizing()) {
        if (level >= KVB_LOG_WARNING) {
            fprintf(stderr, "kvblend: %s\n", msg);
        }
        return;
    }
    static const int py_levels[] = {10, 20, 30, 40};
    int py_level = (level >= KVB_LOG_DEBUG && level <= KVB_LOG_ERROR)
                       ? py_levels[level]
                       : 40;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *logging = PyImport_ImportModule("logging");
    PyObject *res = NULL;
    if (logging != NULL) {
        PyObject *logger =
            PyObject_CallMethod(logging, "getLogger", "s", "kvblend");
        if (logger != NULL) {
            res = PyObject_CallMethod(logger, "log", "iss", py_level, "%s",
                                      msg);
            Py_DECREF(logger);
        }
        Py_DECREF(logging);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable(NULL);
    }
    Py_XDECREF(res);
    PyErr_Restore(type, value, tb);
    PyGILState_Release(gil);
}

/* Parses a log level given as a name ("debug", "info", "warning", "error")
 * or a kvb_log_level int.  Returns 0, or -1 with ValueError set. */
static int parse_log_level(module_state *st, PyObject *obj,
                           kvb_log_level *out)
{
    static const char *names[] = {"debug", "info", "warning", "error"};
    if (PyUnicode_Check(obj)) {
        const char *s = PyUnicode_AsUTF8(obj);
        if (s == NULL) {
            return -1;
        }
        for (int i = 0; i < 4; i++) {
            if (strcmp(s, names[i]) == 0) {
                *out = (kvb_log_level)i;
                return 0;
            }
        }
    } else if (PyLong_Check(obj)) {
        long v = PyLong_AsLong(obj);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (v >= 0 && v <= 3) {
            *out = (kvb_log_level)v;
            return 0;
        }
    }
    raise_invalid(st, "log level %R is not one of 'debug', 'info', "
                      "'warning', 'error' (or 0..3)", obj);
    return -1;
}

/* set_log_level(level): minimum level of C log lines forwarded to the
 * "kvblend" logger. */
static PyObject *mod_set_log_level(PyObject *m, PyObject *arg)
{
    kvb_log_level lvl;
    if (parse_log_level(get_state(m), arg, &lvl) < 0) {
        return NULL;
    }
    kvb_set_log(log_sink, NULL, lvl);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Argument conversion                                                       */
/* ------------------------------------------------------------------------ */

/*
 * Copies a token sequence into a new int32 array (*out, freed by the caller
 * with PyMem_Free; non-NULL even when empty).  A C-contiguous 1-D buffer of
 * signed 4- or 8-byte integers (array('i'), numpy int32/int64) is read
 * directly; any other integer buffer or sequence of objects with __index__
 * (list, tuple, torch tensor) item by item; str and non-integer buffers are
 * refused.  Each id must fit int32; the ValueError names `what`, the index
 * and the value.  Returns 0, or -1 with an exception set.
 */
static int tokens_from_object(module_state *st, PyObject *obj,
                              const char *what, int32_t **out, int64_t *n_out)
{
    *out = NULL;
    *n_out = 0;
    if (PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be a sequence of int token ids, not str", what);
        return -1;
    }
    Py_buffer view = {0};
    if (PyObject_CheckBuffer(obj) &&
        PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        const char *f = view.format ? view.format : "B";
        f += *f == '@' || *f == '=' || *f == '<';
        if (view.ndim > 1 || strlen(f) != 1 || !strchr("bBhHiIlLqQnN", *f)) {
            PyErr_Format(PyExc_TypeError, "%s: buffer of format '%s' with %d "
                         "dimensions is not a 1-D integer array", what,
                         view.format ? view.format : "B", view.ndim);
            PyBuffer_Release(&view);
            return -1;
        }
        if (!strchr("ilqn", *f) || (view.itemsize != 4 && view.itemsize != 8)) {
            PyBuffer_Release(&view); /* unsigned or narrow: item by item */
            view.obj = NULL;
        }
    } else {
        PyErr_Clear(); /* not a C-contiguous buffer: item by item */
    }
    PyObject *seq = NULL;
    if (view.obj == NULL) {
        seq = PySequence_Fast(obj, "token ids must be a sequence of ints or "
                                   "a 1-D integer buffer");
        if (seq == NULL) {
            return -1;
        }
    }
    Py_ssize_t n = seq ? PySequence_Fast_GET_SIZE(seq)
                       : view.len / view.itemsize;
    int32_t *buf = PyMem_Malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    if (buf == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v;
        int overflow = 0;
        if (seq == NULL) {
            const char *e = (const char *)view.buf + i * view.itemsize;
            int32_t v4;
            int64_t v8;
            memcpy(view.itemsize == 4 ? (void *)&v4 : (void *)&v8, e,
                   (size_t)view.itemsize);
            v = view.itemsize == 4 ? v4 : v8;
        } else {
            PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
            PyObject *idx = PyNumber_Index(it);
            if (idx == NULL) {
                PyErr_Format(PyExc_TypeError, "%s[%zd] must be an int, not "
                             "%.100s", what, i, Py_TYPE(it)->tp_name);
                goto fail;
            }
            v = PyLong_AsLongLongAndOverflow(idx, &overflow);
            if (overflow) {
                raise_invalid(st, "%s[%zd] = %S is outside the int32 range "
                              "of token ids", what, i, idx);
            }
            Py_DECREF(idx);
            if (overflow || (v == -1 && PyErr_Occurred())) {
                goto fail;
            }
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            raise_invalid(st, "%s[%zd] = %lld is outside the int32 range of "
                          "token ids", what, i, v);
            goto fail;
        }
        buf[i] = (int32_t)v;
    }
    Py_XDECREF(seq);
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    *out = buf;
    *n_out = n;
    return 0;
fail:
    PyMem_Free(buf);
    Py_XDECREF(seq);
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    return -1;
}

/*
 * Converts a sequence of (start, end) pairs into a new kvb_span array
 * (*out, PyMem_Free by the caller).  None gives *out = NULL, *n_out = 0.
 * Returns 0, or -1 with TypeError/ValueError set naming the bad item.
 */
static int spans_from_object(PyObject *obj, kvb_span **out, int64_t *n_out)
{
    *out = NULL;
    *n_out = 0;
    if (obj == NULL || obj == Py_None) {
        return 0;
    }
    PyObject *seq = PySequence_Fast(obj, "spans must be a sequence of "
                                         "(start, end) pairs");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    kvb_span *spans = PyMem_Malloc(sizeof(kvb_span) * (size_t)(n ? n : 1));
    if (spans == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        long long a, b;
        if (!PyTuple_Check(pair) && !PyList_Check(pair)) {
            PyErr_Format(PyExc_TypeError,
                         "spans[%zd] must be a (start, end) pair, not %.100s",
                         i, Py_TYPE(pair)->tp_name);
            goto fail;
        }
        if (PySequence_Size(pair) != 2) {
            PyErr_Format(PyExc_ValueError,
                         "spans[%zd] must have 2 items (start, end), has %zd",
                         i, PySequence_Size(pair));
            goto fail;
        }
        PyObject *pa = PySequence_GetItem(pair, 0);
        PyObject *pb = PySequence_GetItem(pair, 1);
        a = pa ? PyLong_AsLongLong(pa) : -1;
        if (!(a == -1 && PyErr_Occurred())) {
            b = pb ? PyLong_AsLongLong(pb) : -1;
        } else {
            b = -1;
        }
        Py_XDECREF(pa);
        Py_XDECREF(pb);
        if (PyErr_Occurred()) {
            goto fail;
        }
        spans[i].start = a;
        spans[i].end = b;
    }
    Py_DECREF(seq);
    *out = spans;
    *n_out = n;
    return 0;
fail:
    PyMem_Free(spans);
    Py_DECREF(seq);
    return -1;
}

/* O& converter of an address argument: an int in [0, 2^64); 0 is NULL. */
static int conv_ptr(PyObject *obj, void *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "an address must be an int, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    unsigned long long u = PyLong_AsUnsignedLongLong(obj);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "%R is not a valid address", obj);
        return 0;
    }
    *(void **)out = (void *)(uintptr_t)u;
    return 1;
}

/* Layout: one layer of a paged KV cache as the C library sees it
 * (kvb_paged_layout), built by keyword in kvblend.ops.  Its fields are
 * declared here only. */
typedef struct {
    PyObject_HEAD
    kvb_paged_layout lay;
} LayoutObject;

#define LAYOUT_FIELD(name, type, field)                                    \
    {name, type, offsetof(LayoutObject, lay) +                             \
     offsetof(kvb_paged_layout, field), READONLY, NULL}
static PyMemberDef layout_members[] = {
    LAYOUT_FIELD("k_ptr", T_ULONGLONG, k_base),
    LAYOUT_FIELD("v_ptr", T_ULONGLONG, v_base),
    LAYOUT_FIELD("block_stride", T_LONGLONG, block_stride),
    LAYOUT_FIELD("token_stride", T_LONGLONG, token_stride),
    LAYOUT_FIELD("head_stride", T_LONGLONG, head_stride),
    LAYOUT_FIELD("dim_stride", T_LONGLONG, dim_stride),
    LAYOUT_FIELD("num_blocks", T_LONGLONG, num_blocks),
    LAYOUT_FIELD("block_size", T_LONGLONG, block_size),
    LAYOUT_FIELD("num_kv_heads", T_INT, num_kv_heads),
    LAYOUT_FIELD("head_size", T_INT, head_size),
    LAYOUT_FIELD("dtype", T_INT, dtype),
    LAYOUT_FIELD("device", T_INT, device),
    LAYOUT_FIELD("v_block_stride", T_LONGLONG, v_block_stride),
    LAYOUT_FIELD("v_token_stride", T_LONGLONG, v_token_stride),
    LAYOUT_FIELD("v_head_stride", T_LONGLONG, v_head_stride),
    LAYOUT_FIELD("v_dim_stride", T_LONGLONG, v_dim_stride),
    {NULL, 0, 0, 0, NULL}};
#undef LAYOUT_FIELD

/* Layout(**fields): every field by name, each an int; the four v_*
 * strides may be left out (0).  Errors name the field. */
static int layout_init(LayoutObject *self, PyObject *args, PyObject *kwds)
{
    Py_ssize_t given = kwds != NULL ? PyDict_GET_SIZE(kwds) : 0, used = 0;
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "Layout() takes keyword arguments "
                        "only (the field names)");
        return -1;
    }
    memset(&self->lay, 0, sizeof self->lay);
    for (const PyMemberDef *f = layout_members; f->name != NULL; f++) {
        PyObject *v = kwds != NULL ? PyDict_GetItemString(kwds, f->name)
                                   : NULL;
        char *dst = (char *)self + f->offset;
        if (v == NULL) {
            if (strncmp(f->name, "v_", 2) != 0 || f->type != T_LONGLONG) {
                PyErr_Format(PyExc_TypeError, "Layout() misses field '%s'",
                             f->name);
                return -1;
            }
            continue;
        }
        used++;
        if (!PyLong_Check(v)) {
            PyErr_Format(PyExc_TypeError, "Layout field '%s' must be an int, "
                         "not %.100s", f->name, Py_TYPE(v)->tp_name);
            return -1;
        }
        if (f->type == T_ULONGLONG) { /* an address */
            if (!conv_ptr(v, dst)) {
                return -1;
            }
            continue;
        }
        long long x = PyLong_AsLongLong(v);
        if ((x == -1 && PyErr_Occurred()) ||
            (f->type == T_INT && (x < INT32_MIN || x > INT32_MAX))) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "Layout field '%s' = %R does not "
                         "fit %s", f->name, v, f->type == T_INT ? "int32"
                         : "int64");
            return -1;
        }
        if (f->type == T_INT) {
            int i = (int)x;
            memcpy(dst, &i, sizeof i);
        } else {
            memcpy(dst, &x, sizeof x);
        }
    }
    if (used != given) {
        PyErr_Format(PyExc_TypeError, "Layout() got %zd unknown field(s) "
                     "among %R", given - used, kwds);
        return -1;
    }
    return 0;
}

_Static_assert(sizeof(void *) == sizeof(unsigned long long) &&
                   sizeof(kvb_dtype) == sizeof(int),
               "Layout's members read pointers as unsigned long long");

static PyType_Slot layout_slots[] = {
    {Py_tp_init, layout_init},
    {Py_tp_members, layout_members},
    {Py_tp_doc, "Layout(k_ptr, v_ptr, block_stride, token_stride, "
                "head_stride, dim_stride, num_blocks, block_size, "
                "num_kv_heads, head_size, dtype, device, v_block_stride=0, "
                "v_token_stride=0, v_head_stride=0, v_dim_stride=0)\n--\n\n"
                "One layer of a paged KV cache (kvb_paged_layout); element "
                "strides; all four V strides 0 means K's."},
    {0, NULL}};

static PyType_Spec layout_spec = {
    .name = "kvblend._kvblend.Layout",
    .basicsize = sizeof(LayoutObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = layout_slots,
};

/* O& converter of a Layout argument into a kvb_paged_layout. */
static int conv_layout(PyObject *obj, void *out)
{
    PyObject *m = PyType_GetModuleByDef(Py_TYPE(obj), &kvblend_module);
    if (m == NULL || Py_TYPE(obj) != get_state(m)->layout_type) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "layout must be a kvblend Layout "
                     "(kvblend.ops.paged_layout), not %.100s",
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    *(kvb_paged_layout *)out = ((LayoutObject *)obj)->lay;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Configuration                                                             */
/* ------------------------------------------------------------------------ */

/* Returns a new list of the first `n` ints of `v`. */
static PyObject *list_of_i32(const int32_t *v, int n)
{
    PyObject *l = PyList_New(n);
    for (int i = 0; l != NULL && i < n; i++) {
        PyObject *x = PyLong_FromLong(v[i]);
        if (x == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, x);
    }
    return l;
}

/* Returns the double with the shortest decimal form that rounds to the
 * float `f`, so 0.15f reads back as 0.15 rather than 0.15000000596. */
static double f32_to_short_double(float f)
{
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) {
            return strtod(buf, NULL);
        }
    }
    return (double)f;
}

/* Returns a new list of the first `n` floats of `v`. */
static PyObject *list_of_f32(const float *v, int n)
{
    PyObject *l = PyList_New(n);
    for (int i = 0; l != NULL && i < n; i++) {
        PyObject *x = PyFloat_FromDouble(f32_to_short_double(v[i]));
        if (x == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, x);
    }
    return l;
}

/* Returns a new dict with one key per kvb_config field, from the settings
 * table (kvb_config_get): bools, ints, floats, str or None, lists; an unset
 * list (thresholds) is None. */
static PyObject *config_to_dict(const kvb_config *c)
{
    PyObject *d = PyDict_New();
    kvb_setting v;
    for (int i = 0; d != NULL && kvb_config_get(c, i, &v) == KVB_OK; i++) {
        PyObject *x = NULL;
        switch (v.type) {
        case KVB_SETTING_BOOL:
            x = PyBool_FromLong((long)v.i);
            break;
        case KVB_SETTING_INT:
            x = PyLong_FromLongLong((long long)v.i);
            break;
        case KVB_SETTING_FLOAT:
            x = PyFloat_FromDouble(v.f);
            break;
        case KVB_SETTING_STR:
            x = v.s != NULL ? PyUnicode_FromStringAndSize(v.s, v.n)
                            : Py_NewRef(Py_None);
            break;
        case KVB_SETTING_INT_LIST:
            x = list_of_i32(v.ints, v.n);
            break;
        case KVB_SETTING_FLOAT_LIST:
            x = v.n > 0 ? list_of_f32(v.floats, v.n) : Py_NewRef(Py_None);
            break;
        default:
            continue; /* checked only: no field */
        }
        if (x == NULL || PyDict_SetItemString(d, v.key, x) < 0) {
            Py_XDECREF(x);
            Py_CLEAR(d);
            break;
        }
        Py_DECREF(x);
    }
    return d;
}

/*
 * Builds a kvb_config from `items`, a mapping (or iterable of pairs) of
 * variable name -> value: defaults, kvb_config_set per item, then
 * kvb_config_validate.  Values must be str (int, float and bool are
 * converted with str()).  Returns 0, or -1 with the C message raised as
 * InvalidError (it names the variable) or TypeError for non-str names.
 */
static int config_from_items(module_state *st, PyObject *items,
                             kvb_config *cfg)
{
    kvb_config_init(cfg);
    if (items == NULL || items == Py_None) {
        items = NULL;
    }
    PyObject *d = NULL;
    if (items != NULL) {
        d = PyObject_CallOneArg((PyObject *)&PyDict_Type, items);
        if (d == NULL) {
            return -1;
        }
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (d != NULL && PyDict_Next(d, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "configuration names must be str, "
                         "not %.100s", Py_TYPE(key)->tp_name);
            goto fail;
        }
        PyObject *sval;
        if (PyUnicode_Check(value)) {
            sval = Py_NewRef(value);
        } else if (PyBool_Check(value) || PyLong_Check(value)
                   || PyFloat_Check(value)) {
            sval = PyObject_Str(value);
        } else {
            PyErr_Format(PyExc_TypeError, "configuration value of %U must be "
                         "str, not %.100s", key, Py_TYPE(value)->tp_name);
            goto fail;
        }
        if (sval == NULL) {
            goto fail;
        }
        Py_ssize_t klen = 0, vlen = 0;
        const char *k = PyUnicode_AsUTF8AndSize(key, &klen);
        if (k == NULL || (Py_ssize_t)strlen(k) != klen) {
            PyErr_Clear();
            Py_DECREF(sval);
            raise_invalid(st, "configuration name %R is not a name (NUL "
                          "character or not UTF-8)", key);
            goto fail;
        }
        const char *v = PyUnicode_AsUTF8AndSize(sval, &vlen);
        if (v == NULL) {
            /* os.environ hands bytes that are not UTF-8 over as lone
             * surrogates */
            PyErr_Clear();
            Py_DECREF(sval);
            raise_invalid(st, "%s: the value is not valid UTF-8", k);
            goto fail;
        }
        if ((Py_ssize_t)strlen(v) != vlen) {
            raise_invalid(st, "%s=%R: the value contains a NUL character",
                          k, sval);
            Py_DECREF(sval);
            goto fail;
        }
        kvb_status s = kvb_config_set(cfg, k, v);
        Py_DECREF(sval);
        if (s != KVB_OK) {
            set_error_from_status(st, s);
            goto fail;
        }
    }
    Py_XDECREF(d);
    kvb_status s = kvb_config_validate(cfg);
    if (s != KVB_OK) {
        set_error_from_status(st, s);
        return -1;
    }
    return 0;
fail:
    Py_XDECREF(d);
    return -1;
}

/* config_parse(items) -> dict: validates a mapping of LMCACHE_* /
 * KVBLEND_* variables exactly as the connector will. */
static PyObject *mod_config_parse(PyObject *m, PyObject *items)
{
    kvb_config cfg;
    if (config_from_items(get_state(m), items, &cfg) < 0) {
        return NULL;
    }
    return config_to_dict(&cfg);
}

/* config_from_env() -> dict: kvb_config_from_env over the process
 * environment. */
static PyObject *mod_config_from_env(PyObject *m, PyObject *unused)
{
    kvb_config cfg;
    kvb_status s = kvb_config_from_env(&cfg);
    if (s != KVB_OK) {
        return set_error_from_status(get_state(m), s);
    }
    return config_to_dict(&cfg);
}

/* ------------------------------------------------------------------------ */
/* Lower tiers without a model (the vLLM scheduler's lookup)                 */
/* ------------------------------------------------------------------------ */

#define TIERS_CAPSULE "kvblend.tiers"

static PyObject *tiers_stats_dict(module_state *st, kvb_tiers *tiers);

/* Frees the tiers of a capsule made by tiers_open. */
static void tiers_capsule_free(PyObject *cap)
{
    kvb_tiers *t = PyCapsule_GetPointer(cap, TIERS_CAPSULE);
    Py_BEGIN_ALLOW_THREADS
    kvb_tiers_free(t);
    Py_END_ALLOW_THREADS
}

/* tiers_open(config_items) -> capsule or None: a lookup-only view of the
 * lower tiers the config names (kvb_tiers_open_view). */
static PyObject *mod_tiers_open(PyObject *m, PyObject *items)
{
    kvb_config cfg;
    if (config_from_items(get_state(m), items, &cfg) < 0) {
        return NULL;
    }
    kvb_tiers *t = NULL;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_tiers_open_view(&cfg, &t);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(get_state(m), s);
    }
    if (t == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *cap = PyCapsule_New(t, TIERS_CAPSULE, tiers_capsule_free);
    if (cap == NULL) {
        kvb_tiers_free(t);
    }
    return cap;
}

/* tiers_contains(capsule, key, hash) -> bool. */
static PyObject *mod_tiers_contains(PyObject *m, PyObject *args)
{
    PyObject *cap;
    unsigned long long key, hash;
    if (!PyArg_ParseTuple(args, "OKK:tiers_contains", &cap, &key, &hash)) {
        return NULL;
    }
    kvb_tiers *t = PyCapsule_GetPointer(cap, TIERS_CAPSULE);
    if (t == NULL) {
        return NULL;
    }
    int found = 0;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_tiers_contains(t, key, hash, &found);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(get_state(m), s);
    }
    return PyBool_FromLong(found);
}

/* tiers_stats(capsule) -> {"disk": {...}, "remote": {...}}. */
static PyObject *mod_tiers_stats(PyObject *m, PyObject *cap)
{
    kvb_tiers *t = PyCapsule_GetPointer(cap, TIERS_CAPSULE);
    if (t == NULL) {
        return NULL;
    }
    return tiers_stats_dict(get_state(m), t);
}

/* tier_key(fingerprint, rank, world) -> int. */
static PyObject *mod_tier_key(PyObject *m, PyObject *args)
{
    unsigned long long fp;
    int rank, world;
    if (!PyArg_ParseTuple(args, "Kii:tier_key", &fp, &rank, &world)) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(kvb_tier_key(fp, rank, world));
}

/* ------------------------------------------------------------------------ */
/* Hashing and segmentation                                                  */
/* ------------------------------------------------------------------------ */

/* hash_tokens(tokens, namespace=0) -> int: the position-independent
 * 64-bit key of a segment in a tenant namespace. */
static PyObject *mod_hash_tokens(PyObject *m, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "namespace", NULL};
    PyObject *obj;
    unsigned long long ns = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|K:hash_tokens", kwlist,
                                     &obj, &ns)) {
        return NULL;
    }
    int32_t *tok;
    int64_t n;
    if (tokens_from_object(get_state(m), obj, "tokens", &tok, &n) < 0) {
        return NULL;
    }
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = kvb_hash_tokens_ns(tok, n, (uint64_t)ns);
    Py_END_ALLOW_THREADS
    PyMem_Free(tok);
    return PyLong_FromUnsignedLongLong(h);
}

/* namespace(name) -> int: the namespace of a tenant name (str, UTF-8, or
 * bytes); "" and b"" are the default namespace 0. */
static PyObject *mod_namespace(PyObject *m, PyObject *arg)
{
    const char *p;
    Py_ssize_t len;
    if (PyUnicode_Check(arg)) {
        p = PyUnicode_AsUTF8AndSize(arg, &len);
        if (p == NULL) {
            return NULL;
        }
    } else if (PyBytes_Check(arg)) {
        p = PyBytes_AS_STRING(arg);
        len = PyBytes_GET_SIZE(arg);
    } else {
        return PyErr_Format(PyExc_TypeError, "namespace name must be str or "
                            "bytes, not %.100s", Py_TYPE(arg)->tp_name);
    }
    return PyLong_FromUnsignedLongLong(kvb_namespace(p, (size_t)len));
}

/* Returns a new list of (start, end) tuples for `n` spans. */
static PyObject *spans_to_list(const kvb_span *s, int64_t n)
{
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (int64_t i = 0; l != NULL && i < n; i++) {
        PyObject *t = Py_BuildValue("(LL)", (long long)s[i].start,
                                    (long long)s[i].end);
        if (t == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    return l;
}

/* segment_split(tokens, sep) -> list[(start, end)]: the segments between
 * separator occurrences (kvb_segment_split). */
static PyObject *mod_segment_split(PyObject *m, PyObject *const *args,
                                   Py_ssize_t nargs)
{
    module_state *st = get_state(m);
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "segment_split() takes 2 arguments "
                     "(tokens, sep), %zd given", nargs);
        return NULL;
    }
    int32_t *tok = NULL, *sep = NULL;
    int64_t n, sep_len;
    PyObject *res = NULL;
    if (tokens_from_object(st, args[0], "tokens", &tok, &n) < 0
        || tokens_from_object(st, args[1], "sep", &sep, &sep_len) < 0) {
        goto done;
    }
    /* With sep_len >= 1 there are at most ceil(n / 2) segments. */
    int64_t cap = n / 2 + 1;
    kvb_span *spans = PyMem_Malloc(sizeof(kvb_span) * (size_t)cap);
    if (spans == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t count = 0;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_segment_split(tok, n, sep, sep_len, spans, cap, &count);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        set_error_from_status(st, s);
    } else {
        res = spans_to_list(spans, count);
    }
    PyMem_Free(spans);
done:
    PyMem_Free(tok);
    PyMem_Free(sep);
    return res;
}

/* segment_check(spans, n): raises InvalidError unless `spans` are valid,
 * sorted, non-overlapping boundaries for a prompt of n tokens. */
static PyObject *mod_segment_check(PyObject *m, PyObject *const *args,
                                   Py_ssize_t nargs)
{
    module_state *st = get_state(m);
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "segment_check() takes 2 arguments "
                     "(spans, n), %zd given", nargs);
        return NULL;
    }
    long long n = PyLong_AsLongLong(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    kvb_span *spans;
    int64_t ns;
    if (args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "segment_check() spans must be a "
                        "sequence of (start, end) pairs, not None");
        return NULL;
    }
    if (spans_from_object(args[0], &spans, &ns) < 0) {
        return NULL;
    }
    kvb_status s = kvb_segment_check(spans, ns, (int64_t)n);
    PyMem_Free(spans);
    if (s != KVB_OK) {
        return set_error_from_status(st, s);
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Ops: device -1 runs kvb_cpu_*, device >= 0 runs kvb_cuda_* on `stream`    */
/* ------------------------------------------------------------------------ */

/* Raises the status's exception, or returns None for KVB_OK. */
static PyObject *none_or_error(PyObject *m, kvb_status s)
{
    if (s != KVB_OK) {
        return set_error_from_status(get_state(m), s);
    }
    Py_RETURN_NONE;
}

/* gather(device, layout, slots_ptr, n, k_out_ptr, v_out_ptr, stream=0) and
 * scatter(... k_in_ptr, v_in_ptr ...): a 0 input pointer of scatter writes
 * only the other tensor. */
static PyObject *paged_copy(PyObject *m, PyObject *args, int to_dense)
{
    int device;
    kvb_paged_layout lay;
    void *slots, *k, *v, *stream = NULL;
    long long n;
    if (!PyArg_ParseTuple(args, to_dense ? "iO&O&LO&O&|O&:gather"
                                         : "iO&O&LO&O&|O&:scatter",
                          &device, conv_layout, &lay, conv_ptr, &slots, &n,
                          conv_ptr, &k, conv_ptr, &v, conv_ptr, &stream)) {
        return NULL;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    if (to_dense) {
        s = device < 0 ? kvb_cpu_gather(&lay, slots, n, k, v)
                       : kvb_cuda_gather(&lay, slots, n, k, v, stream);
    } else {
        s = device < 0 ? kvb_cpu_scatter(&lay, slots, n, k, v)
                       : kvb_cuda_scatter(&lay, slots, n, k, v, stream);
    }
    Py_END_ALLOW_THREADS
    return none_or_error(m, s);
}

static PyObject *mod_gather(PyObject *m, PyObject *args)
{
    return paged_copy(m, args, 1);
}

static PyObject *mod_scatter(PyObject *m, PyObject *args)
{
    return paged_copy(m, args, 0);
}

/* rerotate(device, k_ptr, n, num_heads, head_size, dtype, rotary_dim,
 *          style, inv_freq_ptr, attention_factor, old_pos_ptr, new_pos_ptr,
 *          stream=0); inv_freq is a host float32 array in both cases. */
static PyObject *mod_rerotate(PyObject *m, PyObject *args)
{
    int device, heads, hs, dtype, rdim, style;
    void *k, *inv, *oldp, *newp, *stream = NULL;
    long long n;
    float af;
    if (!PyArg_ParseTuple(args, "iO&LiiiiiO&fO&O&|O&:rerotate", &device,
                          conv_ptr, &k, &n, &heads, &hs, &dtype, &rdim,
                          &style, conv_ptr, &inv, &af, conv_ptr, &oldp,
                          conv_ptr, &newp, conv_ptr, &stream)) {
        return NULL;
    }
    kvb_rope rope = {rdim, (kvb_rope_style)style, inv, af};
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = device < 0 ? kvb_cpu_rerotate(k, n, heads, hs, (kvb_dtype)dtype,
                                      &rope, oldp, newp)
                   : kvb_cuda_rerotate(k, n, heads, hs, (kvb_dtype)dtype,
                                       &rope, oldp, newp, stream);
    Py_END_ALLOW_THREADS
    return none_or_error(m, s);
}

/* deviation(device, a_ptr, b_ptr, n, num_heads, head_size, dtype, out_ptr,
 *           stream=0); out is float32 [n]. */
static PyObject *mod_deviation(PyObject *m, PyObject *args)
{
    int device, heads, hs, dtype;
    void *a, *b, *out, *stream = NULL;
    long long n;
    if (!PyArg_ParseTuple(args, "iO&O&LiiiO&|O&:deviation", &device,
                          conv_ptr, &a, conv_ptr, &b, &n, &heads, &hs, &dtype,
                          conv_ptr, &out, conv_ptr, &stream)) {
        return NULL;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = device < 0 ? kvb_cpu_deviation(a, b, n, heads, hs, (kvb_dtype)dtype,
                                       out)
                   : kvb_cuda_deviation(a, b, n, heads, hs, (kvb_dtype)dtype,
                                        out, stream);
    Py_END_ALLOW_THREADS
    return none_or_error(m, s);
}

/* select(device, score_ptr, forced_ptr, n, k, out_idx_ptr, stream=0,
 *        n_forced=0) -> count.  On the device the caller gives the number
 * of forced rows (the mask stays there). */
static PyObject *mod_select(PyObject *m, PyObject *args)
{
    int device;
    void *score, *forced, *out, *stream = NULL;
    long long n, k, n_forced = 0;
    int64_t count = 0;
    if (!PyArg_ParseTuple(args, "iO&O&LLO&|O&L:select", &device, conv_ptr,
                          &score, conv_ptr, &forced, &n, &k, conv_ptr, &out,
                          conv_ptr, &stream, &n_forced)) {
        return NULL;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = device < 0 ? kvb_cpu_select(score, forced, n, k, out, &count)
                   : kvb_cuda_select(score, forced, n, n_forced, k, out,
                                     stream, &count);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(get_state(m), s);
    }
    return PyLong_FromLongLong((long long)count);
}

/* attention(device, q_ptr, q_pos_ptr, nq, k_ptr, v_ptr, k_pos_ptr, nk,
 *           num_q_heads, num_kv_heads, head_size, scale, dtype, out_ptr,
 *           stream=0) */
static PyObject *mod_attention(PyObject *m, PyObject *args)
{
    int device, nqh, nkh, hs, dtype;
    void *q, *qpos, *k, *v, *kpos, *out, *stream = NULL;
    long long nq, nk;
    float scale;
    if (!PyArg_ParseTuple(args, "iO&O&LO&O&O&LiiifiO&|O&:attention", &device,
                          conv_ptr, &q, conv_ptr, &qpos, &nq, conv_ptr, &k,
                          conv_ptr, &v, conv_ptr, &kpos, &nk, &nqh, &nkh, &hs,
                          &scale, &dtype, conv_ptr, &out, conv_ptr, &stream)) {
        return NULL;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = device < 0
            ? kvb_cpu_attention(q, qpos, nq, k, v, kpos, nk, nqh, nkh, hs,
                                scale, (kvb_dtype)dtype, out)
            : kvb_cuda_attention(q, qpos, nq, k, v, kpos, nk, nqh, nkh, hs,
                                 scale, (kvb_dtype)dtype, out, stream);
    Py_END_ALLOW_THREADS
    return none_or_error(m, s);
}

/* set_num_threads(n): threads CPU ops may use (0 = all cores). */
static PyObject *mod_set_num_threads(PyObject *m, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n < 0 || n > KVB_MAX_CPU_THREADS) {
        return raise_invalid(get_state(m), "set_num_threads(): n = %ld must "
                             "be in [0, %d] (0 = all cores)", n,
                             KVB_MAX_CPU_THREADS);
    }
    kvb_status s = kvb_cpu_set_threads((int)n);
    if (s != KVB_OK) {
        return set_error_from_status(get_state(m), s);
    }
    Py_RETURN_NONE;
}

/* version() -> str: the C library's version. */
static PyObject *mod_version(PyObject *m, PyObject *unused)
{
    return PyUnicode_FromString(kvb_version());
}

/* has_cuda() -> bool: whether libkvblend was built with CUDA kernels. */
static PyObject *mod_has_cuda(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(kvb_has_cuda());
}

/* ------------------------------------------------------------------------ */
/* Connector                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    kvb_connector *conn; /* owned */
    int32_t device;
} ConnectorObject;

typedef struct {
    PyObject_HEAD
    kvb_request *req;    /* owned until finish; NULL after */
    PyObject *connector; /* strong reference: the request uses its store */
    int busy;            /* calls in flight with the GIL released */
} RequestObject;

/*
 * Connector(config_items, num_layers, num_q_heads, num_kv_heads, head_size,
 *           dtype, rotary_dim, rope_style, inv_freq, attention_factor=1.0,
 *           device=-1, architecture=None): parses config_items like config_parse, copies
 * inv_freq (rotary_dim/2 floats) and creates the C connector with its
 * store.  The connector's log level becomes the configured
 * KVBLEND_LOG_LEVEL.
 */
static PyObject *connector_new(PyTypeObject *type, PyObject *args,
                               PyObject *kwds)
{
    static char *kwlist[] = {"config_items", "num_layers", "num_q_heads",
                             "num_kv_heads", "head_size", "dtype",
                             "rotary_dim", "rope_style", "inv_freq",
                             "attention_factor", "device", "architecture",
                             NULL};
    module_state *st = PyType_GetModuleState(type);
    PyObject *items, *inv_obj;
    const char *arch = NULL;
    kvb_model_desc md;
    int dtype, style, device = -1;
    float af = 1.0f;
    memset(&md, 0, sizeof md);
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OiiiiiiiO|fiz:Connector", kwlist, &items,
            &md.num_layers, &md.num_q_heads, &md.num_kv_heads, &md.head_size,
            &dtype, &md.rope.rotary_dim, &style, &inv_obj, &af, &device,
            &arch)) {
        return NULL;
    }
    md.architecture = arch;
    md.dtype = (kvb_dtype)dtype;
    md.rope.style = (kvb_rope_style)style;
    md.rope.attention_factor = af;
    kvb_config cfg;
    if (config_from_items(st, items, &cfg) < 0) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(inv_obj, "inv_freq must be a sequence "
                                             "of floats");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(seq);
    if (md.rope.rotary_dim > 0 && nf != md.rope.rotary_dim / 2) {
        Py_DECREF(seq);
        return raise_invalid(st, "inv_freq has %zd entries; rotary_dim = %d "
                             "needs rotary_dim/2 = %d", nf,
                             (int)md.rope.rotary_dim,
                             (int)(md.rope.rotary_dim / 2));
    }
    float *inv = PyMem_Malloc(sizeof(float) * (size_t)(nf ? nf : 1));
    if (inv == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        double d = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (d == -1.0 && PyErr_Occurred()) {
            PyMem_Free(inv);
            Py_DECREF(seq);
            return NULL;
        }
        inv[i] = (float)d;
    }
    Py_DECREF(seq);
    md.rope.inv_freq = inv;
    kvb_connector *conn = NULL;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_connector_create(&cfg, &md, device, &conn);
    Py_END_ALLOW_THREADS
    PyMem_Free(inv);
    if (s != KVB_OK) {
        return set_error_from_status(st, s);
    }
    ConnectorObject *self = (ConnectorObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        kvb_connector_free(conn);
        return NULL;
    }
    self->conn = conn;
    self->device = device;
    kvb_set_log(log_sink, NULL, cfg.log_level);
    return (PyObject *)self;
}

/* Frees the C connector (and its store) and drops the type reference. */
static void connector_dealloc(ConnectorObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    kvb_connector *conn = self->conn;
    self->conn = NULL;
    if (conn != NULL) {
        Py_BEGIN_ALLOW_THREADS
        kvb_connector_free(conn);
        Py_END_ALLOW_THREADS
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* set_separator(tokens): the separator's token ids ([] disables splitting). */
static PyObject *connector_set_separator(ConnectorObject *self, PyObject *arg)
{
    module_state *st = state_of((PyObject *)self);
    int32_t *sep;
    int64_t n;
    if (tokens_from_object(st, arg, "separator", &sep, &n) < 0) {
        return NULL;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_connector_set_separator(self->conn, sep, n);
    Py_END_ALLOW_THREADS
    PyMem_Free(sep);
    if (s != KVB_OK) {
        return set_error_from_status(st, s);
    }
    Py_RETURN_NONE;
}

/* lookup(tokens, spans=None) -> ([(start, end, hit)], reuse_end): which
 * segments are stored; no side effects. */
static PyObject *connector_lookup(ConnectorObject *self, PyObject *args,
                                  PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "spans", "namespace", NULL};
    module_state *st = state_of((PyObject *)self);
    PyObject *tok_obj, *spans_obj = Py_None, *res = NULL;
    unsigned long long tenant = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OK:lookup", kwlist,
                                     &tok_obj, &spans_obj, &tenant)) {
        return NULL;
    }
    int32_t *tok = NULL;
    kvb_span *spans = NULL, *segs = NULL;
    uint8_t *hit = NULL;
    int64_t n, ns;
    if (tokens_from_object(st, tok_obj, "tokens", &tok, &n) < 0
        || spans_from_object(spans_obj, &spans, &ns) < 0) {
        goto done;
    }
    int64_t cap = spans != NULL ? ns : n / 2 + 1;
    if (cap < 1) {
        cap = 1;
    }
    segs = PyMem_Malloc(sizeof(kvb_span) * (size_t)cap);
    hit = PyMem_Malloc((size_t)cap);
    if (segs == NULL || hit == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t nseg = 0, reuse_end = 0;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_connector_lookup(self->conn, (uint64_t)tenant, tok, n, spans, ns,
                             segs, hit, cap, &nseg, &reuse_end);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        set_error_from_status(st, s);
        goto done;
    }
    PyObject *l = PyList_New((Py_ssize_t)nseg);
    for (int64_t i = 0; l != NULL && i < nseg; i++) {
        PyObject *t = Py_BuildValue("(LLO)", (long long)segs[i].start,
                                    (long long)segs[i].end,
                                    hit[i] ? Py_True : Py_False);
        if (t == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    if (l != NULL) {
        res = Py_BuildValue("(NL)", l, (long long)reuse_end);
    }
done:
    PyMem_Free(tok);
    PyMem_Free(spans);
    PyMem_Free(segs);
    PyMem_Free(hit);
    return res;
}

/* begin(tokens, spans=None, blend_end=-1, save=True) -> Request: the
 * worker-side state of one prefill.  blend_end >= 0 is the row count the
 * scheduler promised the engine; < 0 uses the lookup's reuse_end. */
static PyObject *connector_begin(ConnectorObject *self, PyObject *args,
                                 PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "spans", "blend_end", "save",
                             "namespace", NULL};
    module_state *st = state_of((PyObject *)self);
    PyObject *tok_obj, *spans_obj = Py_None, *res = NULL;
    long long blend_end = -1;
    int save = 1;
    unsigned long long tenant = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OLpK:begin", kwlist,
                                     &tok_obj, &spans_obj, &blend_end,
                                     &save, &tenant)) {
        return NULL;
    }
    int32_t *tok = NULL;
    kvb_span *spans = NULL;
    int64_t n, ns;
    if (tokens_from_object(st, tok_obj, "tokens", &tok, &n) < 0
        || spans_from_object(spans_obj, &spans, &ns) < 0) {
        goto done;
    }
    kvb_request *req = NULL;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_request_begin(self->conn, (uint64_t)tenant, tok, n, spans, ns,
                          (int64_t)blend_end, save, &req);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        set_error_from_status(st, s);
        goto done;
    }
    RequestObject *r =
        (RequestObject *)st->request_type->tp_alloc(st->request_type, 0);
    if (r == NULL) {
        kvb_request_finish(req, 0);
        goto done;
    }
    r->req = req;
    r->connector = Py_NewRef((PyObject *)self);
    r->busy = 0;
    res = (PyObject *)r;
done:
    PyMem_Free(tok);
    PyMem_Free(spans);
    return res;
}

/* store_stats() -> dict of the store's counters and sizes. */
static PyObject *connector_store_stats(ConnectorObject *self,
                                       PyObject *unused)
{
    kvb_store_stats ss;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_store_get_stats(kvb_connector_store(self->conn), &ss);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    return Py_BuildValue(
        "{s:L,s:n,s:n,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}",
        "num_entries", (long long)ss.num_entries,
        "host_bytes", (Py_ssize_t)ss.host_bytes,
        "device_bytes", (Py_ssize_t)ss.device_bytes,
        "lookups", (long long)ss.lookups, "hits", (long long)ss.hits,
        "inserts", (long long)ss.inserts,
        "evictions", (long long)ss.evictions,
        "rejected", (long long)ss.rejected,
        "collisions", (long long)ss.collisions,
        "promotions", (long long)ss.promotions,
        "demotions", (long long)ss.demotions,
        "corrupt", (long long)ss.corrupt);
}

/* One tier's counters as a dict. */
static PyObject *tier_stats_dict(const kvb_tier_stats *t)
{
    return Py_BuildValue(
        "{s:O,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:K,s:K,s:L,s:K}",
        "enabled", t->enabled ? Py_True : Py_False,
        "lookups", (long long)t->lookups, "hits", (long long)t->hits,
        "misses", (long long)t->misses, "errors", (long long)t->errors,
        "corrupt", (long long)t->corrupt, "writes", (long long)t->writes,
        "write_errors", (long long)t->write_errors,
        "writes_dropped", (long long)t->writes_dropped,
        "bytes_read", (unsigned long long)t->bytes_read,
        "bytes_written", (unsigned long long)t->bytes_written,
        "entries", (long long)t->entries,
        "bytes", (unsigned long long)t->bytes);
}

/* {"disk": {...}, "remote": {...}} of `tiers`, or None without tiers. */
static PyObject *tiers_stats_dict(module_state *st, kvb_tiers *tiers)
{
    if (tiers == NULL) {
        Py_RETURN_NONE;
    }
    kvb_tier_stats d, r;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_tiers_get_stats(tiers, &d, &r);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(st, s);
    }
    return Py_BuildValue("{s:N,s:N}", "disk", tier_stats_dict(&d), "remote",
                         tier_stats_dict(&r));
}

/* tier_stats() -> dict per lower tier, or None when none is configured. */
static PyObject *connector_tier_stats(ConnectorObject *self, PyObject *unused)
{
    return tiers_stats_dict(state_of((PyObject *)self),
                            kvb_connector_tiers(self->conn));
}

/* flush_tiers(): waits until queued disk/remote writes are done. */
static PyObject *connector_flush_tiers(ConnectorObject *self,
                                       PyObject *unused)
{
    kvb_tiers *t = kvb_connector_tiers(self->conn);
    if (t != NULL) {
        Py_BEGIN_ALLOW_THREADS
        kvb_tiers_flush(t);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* set_shard(rank, world): the tensor-parallel shard of the tier key. */
static PyObject *connector_set_shard(ConnectorObject *self, PyObject *args)
{
    int rank, world;
    if (!PyArg_ParseTuple(args, "ii:set_shard", &rank, &world)) {
        return NULL;
    }
    kvb_status s = kvb_connector_set_shard(self->conn, rank, world);
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    Py_RETURN_NONE;
}

/* set_model_id(bytes): an identity of the model's weights for the tier
 * key. */
static PyObject *connector_set_model_id(ConnectorObject *self, PyObject *arg)
{
    char *buf;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(arg, &buf, &len) < 0) {
        return NULL;
    }
    kvb_status s = kvb_connector_set_model_id(self->conn, buf, (size_t)len);
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    Py_RETURN_NONE;
}

/* store_clear(): removes every unpinned entry. */
static PyObject *connector_store_clear(ConnectorObject *self,
                                       PyObject *unused)
{
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_store_clear(kvb_connector_store(self->conn));
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    Py_RETURN_NONE;
}

/* watch_store(enabled): starts or stops the store's event log. */
static PyObject *connector_watch_store(ConnectorObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0) {
        return NULL;
    }
    kvb_status s = kvb_store_watch(kvb_connector_store(self->conn), on);
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    Py_RETURN_NONE;
}

/* take_store_events() -> ([(hash, num_tokens, added), ...], lost): every
 * event recorded since the last call, oldest first. */
static PyObject *connector_take_store_events(ConnectorObject *self,
                                             PyObject *unused)
{
    enum { BATCH = 256 };
    kvb_store_event ev[BATCH];
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    int lost_any = 0;
    for (;;) {
        int64_t n = 0;
        int lost = 0;
        kvb_status s;
        Py_BEGIN_ALLOW_THREADS
        s = kvb_store_take_events(kvb_connector_store(self->conn), ev, BATCH,
                                  &n, &lost);
        Py_END_ALLOW_THREADS
        if (s != KVB_OK) {
            Py_DECREF(list);
            return set_error_from_status(state_of((PyObject *)self), s);
        }
        lost_any |= lost;
        for (int64_t i = 0; i < n; i++) {
            PyObject *t = Py_BuildValue(
                "(KLO)", (unsigned long long)ev[i].hash,
                (long long)ev[i].num_tokens,
                ev[i].kind == KVB_STORE_EVENT_ADDED ? Py_True : Py_False);
            if (t == NULL || PyList_Append(list, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(t);
        }
        if (n < BATCH) {
            break;
        }
    }
    return Py_BuildValue("(NO)", list, lost_any ? Py_True : Py_False);
}

/* Getter of Connector.device. */
static PyObject *connector_get_device(ConnectorObject *self, void *closure)
{
    return PyLong_FromLong(self->device);
}

/* Getter of Connector.tier_key. */
static PyObject *connector_get_tier_key(ConnectorObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(kvb_connector_tier_key(self->conn));
}

/* Getter of Connector.fingerprint. */
static PyObject *connector_get_fingerprint(ConnectorObject *self,
                                           void *closure)
{
    return PyLong_FromUnsignedLongLong(kvb_connector_fingerprint(self->conn));
}

static PyMethodDef connector_methods[] = {
    {"set_separator", (PyCFunction)connector_set_separator, METH_O,
     "set_separator(tokens)\n--\n\nSets the separator's token ids."},
    {"lookup", (PyCFunction)(void (*)(void))connector_lookup,
     METH_VARARGS | METH_KEYWORDS,
     "lookup(tokens, spans=None, namespace=0)\n--\n\n"
     "Returns ([(start, end, hit), ...], reuse_end); no side effects."},
    {"begin", (PyCFunction)(void (*)(void))connector_begin,
     METH_VARARGS | METH_KEYWORDS,
     "begin(tokens, spans=None, blend_end=-1, save=True, namespace=0)"
     "\n--\n\n"
     "Starts one prefill and returns its Request."},
    {"store_stats", (PyCFunction)connector_store_stats, METH_NOARGS,
     "store_stats()\n--\n\nReturns the store's counters as a dict."},
    {"store_clear", (PyCFunction)connector_store_clear, METH_NOARGS,
     "store_clear()\n--\n\nRemoves every unpinned entry."},
    {"tier_stats", (PyCFunction)connector_tier_stats, METH_NOARGS,
     "tier_stats()\n--\n\n"
     "The disk and remote tiers' counters, or None without lower tiers."},
    {"flush_tiers", (PyCFunction)connector_flush_tiers, METH_NOARGS,
     "flush_tiers()\n--\n\nWaits until queued disk/remote writes are done."},
    {"set_shard", (PyCFunction)connector_set_shard, METH_VARARGS,
     "set_shard(rank, world)\n--\n\n"
     "Declares the tensor-parallel shard this connector stores."},
    {"set_model_id", (PyCFunction)connector_set_model_id, METH_O,
     "set_model_id(digest)\n--\n\n"
     "Mixes an identity of the model's weights (bytes) into the tier key."},
    {"watch_store", (PyCFunction)connector_watch_store, METH_O,
     "watch_store(enabled)\n--\n\nStarts or stops the store's event log."},
    {"take_store_events", (PyCFunction)connector_take_store_events,
     METH_NOARGS,
     "take_store_events()\n--\n\n"
     "Returns ([(hash, num_tokens, added), ...], lost) since the last call."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef connector_getset[] = {
    {"device", (getter)connector_get_device, NULL,
     "-1 for the CPU path, else the CUDA device ordinal", NULL},
    {"fingerprint", (getter)connector_get_fingerprint, NULL,
     "the model's fingerprint (architecture, shape, dtype, RoPE)", NULL},
    {"tier_key", (getter)connector_get_tier_key, NULL,
     "the key of this model and shard in the disk and remote tiers", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot connector_slots[] = {
    {Py_tp_new, connector_new},
    {Py_tp_dealloc, connector_dealloc},
    {Py_tp_methods, connector_methods},
    {Py_tp_getset, connector_getset},
    {Py_tp_doc,
     "Connector(config_items, num_layers, num_q_heads, num_kv_heads, "
     "head_size, dtype, rotary_dim, rope_style, inv_freq, "
     "attention_factor=1.0, device=-1, architecture=None)\n\n"
     "Blending state of one model: a chunk store and the separator."},
    {0, NULL}};

static PyType_Spec connector_spec = {
    .name = "kvblend._kvblend.Connector",
    .basicsize = sizeof(ConnectorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = connector_slots,
};

/* ------------------------------------------------------------------------ */
/* Request                                                                   */
/* ------------------------------------------------------------------------ */

/* Returns the live kvb_request of `self`, or NULL with InvalidError set
 * when the request was finished. */
static kvb_request *request_live(RequestObject *self)
{
    if (self->req == NULL) {
        raise_invalid(state_of((PyObject *)self),
                      "the request is finished");
    }
    return self->req;
}

/* Ends the request without committing if the owner never finished it,
 * then drops the connector reference (after, since the request uses the
 * connector's store). */
static void request_dealloc(RequestObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    kvb_request *req = self->req;
    self->req = NULL;
    if (req != NULL) {
        Py_BEGIN_ALLOW_THREADS
        kvb_request_finish(req, 0);
        Py_END_ALLOW_THREADS
    }
    Py_CLEAR(self->connector);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Getter of Request.blend_end: rows [0, blend_end) are blended. */
static PyObject *request_get_blend_end(RequestObject *self, void *closure)
{
    kvb_request *req = request_live(self);
    return req ? PyLong_FromLongLong(kvb_request_blend_end(req)) : NULL;
}

/* Getter of Request.finished. */
static PyObject *request_get_finished(RequestObject *self, void *closure)
{
    return PyBool_FromLong(self->req == NULL);
}

/* forced() -> bytes of length blend_end; 1 marks rows always recomputed. */
static PyObject *request_forced(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    if (req == NULL) {
        return NULL;
    }
    int64_t n = kvb_request_blend_end(req);
    const uint8_t *f = kvb_request_forced(req);
    if (n <= 0 || f == NULL) {
        return PyBytes_FromStringAndSize("", 0);
    }
    return PyBytes_FromStringAndSize((const char *)f, (Py_ssize_t)n);
}

/* commit() -> number of segments made visible now (complete at every
 * layer); the request goes on. */
static PyObject *request_commit(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    if (req == NULL) {
        return NULL;
    }
    int64_t n = 0;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_request_commit(req, &n);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    return PyLong_FromLongLong((long long)n);
}

/* counts() -> (n_segments, n_hit, n_forced). */
static PyObject *request_counts(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    if (req == NULL) {
        return NULL;
    }
    int64_t a = 0, b = 0, c = 0;
    kvb_status s = kvb_request_counts(req, &a, &b, &c);
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    return Py_BuildValue("(LLL)", (long long)a, (long long)b, (long long)c);
}

/* reused() -> [(start, num_tokens), ...]: the rows of each reused
 * segment, in prompt order. */
static PyObject *request_reused(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    if (req == NULL) {
        return NULL;
    }
    int64_t n_hit = 0;
    kvb_status s = kvb_request_counts(req, NULL, &n_hit, NULL);
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    PyObject *out = PyList_New((Py_ssize_t)n_hit);
    for (int64_t i = 0; out != NULL && i < n_hit; i++) {
        int64_t start = 0, len = 0;
        s = kvb_request_reused(req, i, &start, &len);
        PyObject *t = s == KVB_OK
            ? Py_BuildValue("(LL)", (long long)start, (long long)len)
            : set_error_from_status(state_of((PyObject *)self), s);
        if (t == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    return out;
}

/* load_layer(layer, k_ptr, v_ptr, stream=0): fills the staging rows of
 * stored segments with layer `layer`'s KV, keys re-rotated; save_layer(layer,
 * layout, slots_ptr, n, stream=0) copies layer `layer` of every reserved
 * segment out of the paged cache into the store (slots: host int64 [n]). */
static PyObject *request_layer(RequestObject *self, PyObject *args, int save)
{
    int layer;
    kvb_paged_layout lay;
    void *k = NULL, *v = NULL, *slots = NULL, *stream = NULL;
    long long n = 0;
    int ok = save ? PyArg_ParseTuple(args, "iO&O&L|O&:save_layer", &layer,
                                     conv_layout, &lay, conv_ptr, &slots, &n,
                                     conv_ptr, &stream)
                  : PyArg_ParseTuple(args, "iO&O&|O&:load_layer", &layer,
                                     conv_ptr, &k, conv_ptr, &v, conv_ptr,
                                     &stream);
    kvb_request *req = ok ? request_live(self) : NULL;
    if (req == NULL) {
        return NULL;
    }
    kvb_status s;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    s = save ? kvb_request_save_layer(req, layer, &lay, slots, n, stream)
             : kvb_request_load_layer(req, layer, k, v, stream);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    Py_RETURN_NONE;
}

static PyObject *request_load_layer(RequestObject *self, PyObject *args)
{
    return request_layer(self, args, 0);
}

static PyObject *request_save_layer(RequestObject *self, PyObject *args)
{
    return request_layer(self, args, 1);
}

/* finish(commit=True): ends the request (idempotent).  Refused while a
 * load/save of the same request runs on another thread. */
static PyObject *request_finish(RequestObject *self, PyObject *args,
                                PyObject *kwds)
{
    static char *kwlist[] = {"commit", NULL};
    int commit = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:finish", kwlist,
                                     &commit)) {
        return NULL;
    }
    if (self->busy > 0) {
        return raise_invalid(state_of((PyObject *)self),
                             "finish() while load_layer/save_layer of the same "
                             "request runs on another thread");
    }
    kvb_request *req = self->req;
    self->req = NULL;
    if (req != NULL) {
        Py_BEGIN_ALLOW_THREADS
        kvb_request_finish(req, commit);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* __enter__() returns the request itself. */
static PyObject *request_enter(RequestObject *self, PyObject *unused)
{
    return Py_NewRef((PyObject *)self);
}

/* __exit__(exc_type, exc, tb): finishes, committing only without an
 * exception. */
static PyObject *request_exit(RequestObject *self, PyObject *const *args,
                              Py_ssize_t nargs)
{
    int commit = nargs < 1 || args[0] == Py_None;
    PyObject *a = Py_BuildValue("(i)", commit);
    if (a == NULL) {
        return NULL;
    }
    PyObject *r = request_finish(self, a, NULL);
    Py_DECREF(a);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyMethodDef request_methods[] = {
    {"forced", (PyCFunction)request_forced, METH_NOARGS,
     "forced()\n--\n\nbytes of length blend_end; 1 = row always recomputed."},
    {"commit", (PyCFunction)request_commit, METH_NOARGS,
     "commit()\n--\n\nCommits the segments saved at every layer; "
     "returns their count."},
    {"reused", (PyCFunction)request_reused, METH_NOARGS,
     "reused() -> [(start, num_tokens)] of each reused segment"},
    {"counts", (PyCFunction)request_counts, METH_NOARGS,
     "counts()\n--\n\nReturns (n_segments, n_hit, n_forced)."},
    {"load_layer", (PyCFunction)request_load_layer, METH_VARARGS,
     "load_layer(layer, k_ptr, v_ptr, stream=0)\n--\n\n"
     "Loads a layer's stored KV into staging [blend_end, H, D]."},
    {"save_layer", (PyCFunction)request_save_layer, METH_VARARGS,
     "save_layer(layer, layout, slots_ptr, n, stream=0)\n--\n\n"
     "Saves a layer of the reserved segments from the paged cache."},
    {"finish", (PyCFunction)(void (*)(void))request_finish,
     METH_VARARGS | METH_KEYWORDS,
     "finish(commit=True)\n--\n\nEnds the request (idempotent)."},
    {"__enter__", (PyCFunction)request_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))request_exit, METH_FASTCALL,
     NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef request_getset[] = {
    {"blend_end", (getter)request_get_blend_end, NULL,
     "rows [0, blend_end) are blended", NULL},
    {"finished", (getter)request_get_finished, NULL,
     "True once finish() ran", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot request_slots[] = {
    {Py_tp_dealloc, request_dealloc},
    {Py_tp_methods, request_methods},
    {Py_tp_getset, request_getset},
    {Py_tp_doc, "One prefill's blend state; made by Connector.begin()."},
    {0, NULL}};

static PyType_Spec request_spec = {
    .name = "kvblend._kvblend.Request",
    .basicsize = sizeof(RequestObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE
             | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = request_slots,
};

/* ------------------------------------------------------------------------ */
/* Module                                                                    */
/* ------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"tiers_open", mod_tiers_open, METH_O,
     "tiers_open(config_items)\n--\n\n"
     "Opens the disk/remote tiers the config names (None when none)."},
    {"tiers_contains", mod_tiers_contains, METH_VARARGS,
     "tiers_contains(tiers, key, hash)\n--\n\n"
     "Whether the disk or remote tier holds the entry."},
    {"tiers_stats", mod_tiers_stats, METH_O,
     "tiers_stats(tiers)\n--\n\nThe tiers' counters."},
    {"tier_key", mod_tier_key, METH_VARARGS,
     "tier_key(fingerprint, rank, world)\n--\n\n"
     "The key of a model shard in the disk and remote tiers."},
    {"version", mod_version, METH_NOARGS,
     "version()\n--\n\nThe C library's version string."},
    {"has_cuda", mod_has_cuda, METH_NOARGS,
     "has_cuda()\n--\n\nTrue when built with CUDA kernels."},
    {"set_log_level", mod_set_log_level, METH_O,
     "set_log_level(level)\n--\n\nMinimum level of C log lines forwarded to "
     "logging.getLogger('kvblend')."},
    {"set_num_threads", mod_set_num_threads, METH_O,
     "set_num_threads(n)\n--\n\nThreads CPU ops may use (0 = all cores)."},
    {"config_from_env", mod_config_from_env, METH_NOARGS,
     "config_from_env()\n--\n\nThe configuration of the process environment "
     "as a dict."},
    {"config_parse", mod_config_parse, METH_O,
     "config_parse(items)\n--\n\nValidates a mapping of LMCACHE_*/KVBLEND_* "
     "variables; returns the configuration as a dict."},
    {"hash_tokens", (PyCFunction)(void (*)(void))mod_hash_tokens,
     METH_VARARGS | METH_KEYWORDS,
     "hash_tokens(tokens, namespace=0)\n--\n\nThe key of a segment: "
     "XXH3-64 of the token ids as int32, seeded with the namespace."},
    {"namespace", mod_namespace, METH_O,
     "namespace(name)\n--\n\nThe tenant namespace of a name (str or "
     "bytes); the empty name is 0."},
    {"segment_split", (PyCFunction)(void (*)(void))mod_segment_split,
     METH_FASTCALL,
     "segment_split(tokens, sep)\n--\n\nSegments between separators as "
     "[(start, end)]."},
    {"segment_check", (PyCFunction)(void (*)(void))mod_segment_check,
     METH_FASTCALL,
     "segment_check(spans, n)\n--\n\nRaises InvalidError on bad spans."},
    {"gather", mod_gather, METH_VARARGS,
     "gather(device, layout, slots_ptr, n, k_out_ptr, v_out_ptr, stream=0)"},
    {"scatter", mod_scatter, METH_VARARGS,
     "scatter(device, layout, slots_ptr, n, k_in_ptr, v_in_ptr, stream=0)"},
    {"rerotate", mod_rerotate, METH_VARARGS,
     "rerotate(device, k_ptr, n, num_heads, head_size, dtype, rotary_dim, "
     "style, inv_freq_ptr, attention_factor, old_pos_ptr, new_pos_ptr, "
     "stream=0)"},
    {"deviation", mod_deviation, METH_VARARGS,
     "deviation(device, a_ptr, b_ptr, n, num_heads, head_size, dtype, "
     "out_ptr, stream=0)"},
    {"select", mod_select, METH_VARARGS,
     "select(device, score_ptr, forced_ptr, n, k, out_idx_ptr, stream=0, "
     "n_forced=0) -> count"},
    {"attention", mod_attention, METH_VARARGS,
     "attention(device, q_ptr, q_pos_ptr, nq, k_ptr, v_ptr, k_pos_ptr, nk, "
     "num_q_heads, num_kv_heads, head_size, scale, dtype, out_ptr, "
     "stream=0)"},
    {NULL, NULL, 0, NULL}};

/* Creates exception `name` (qualified "kvblend.<name>") deriving from
 * `error` and, when non-NULL, `extra`; adds it to the module.  Returns a
 * new reference or NULL. */
static PyObject *make_exception(PyObject *m, const char *name,
                                PyObject *error, PyObject *extra,
                                const char *doc)
{
    char qual[64];
    snprintf(qual, sizeof qual, "kvblend.%s", name);
    PyObject *bases = extra ? PyTuple_Pack(2, error, extra)
                            : PyTuple_Pack(1, error);
    if (bases == NULL) {
        return NULL;
    }
    PyObject *exc = PyErr_NewExceptionWithDoc(qual, doc, bases, NULL);
    Py_DECREF(bases);
    if (exc == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, name, exc) < 0) {
        Py_DECREF(exc);
        return NULL;
    }
    return exc;
}

/* Module exec slot: creates the exceptions, types and constants, and
 * routes C log lines (WARNING and above) to logging.getLogger("kvblend"). */
static int module_exec(PyObject *m)
{
    module_state *st = get_state(m);
    st->error = PyErr_NewExceptionWithDoc(
        "kvblend.Error", "Base class of every error raised by kvblend.",
        NULL, NULL);
    if (st->error == NULL || PyModule_AddObjectRef(m, "Error", st->error) < 0) {
        return -1;
    }
    if (!(st->invalid_error = make_exception(m, "InvalidError", st->error,
            PyExc_ValueError, "A bad argument or configuration value."))
        || !(st->nomem_error = make_exception(m, "NoMemoryError", st->error,
            PyExc_MemoryError, "An allocation failed."))
        || !(st->unsupported_error = make_exception(m, "UnsupportedError",
            st->error, PyExc_NotImplementedError,
            "A dtype, layout or feature is not supported."))
        || !(st->cuda_error = make_exception(m, "CudaError", st->error,
            PyExc_RuntimeError, "A CUDA runtime call failed."))
        || !(st->notfound_error = make_exception(m, "NotFoundError",
            st->error, PyExc_LookupError, "A looked-up object is missing."))
        || !(st->internal_error = make_exception(m, "InternalError",
            st->error, PyExc_RuntimeError,
            "An internal invariant failed (a bug in kvblend)."))) {
        return -1;
    }
    st->connector_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &connector_spec, NULL);
    if (st->connector_type == NULL
        || PyModule_AddType(m, st->connector_type) < 0) {
        return -1;
    }
    st->request_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &request_spec, NULL);
    if (st->request_type == NULL
        || PyModule_AddType(m, st->request_type) < 0) {
        return -1;
    }
    st->layout_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &layout_spec, NULL);
    if (st->layout_type == NULL
        || PyModule_AddType(m, st->layout_type) < 0) {
        return -1;
    }
    static const struct {
        const char *name;
        long value;
    } consts[] = {
        {"DTYPE_F32", KVB_DTYPE_F32}, {"DTYPE_F16", KVB_DTYPE_F16},
        {"DTYPE_BF16", KVB_DTYPE_BF16}, {"ROPE_NEOX", KVB_ROPE_NEOX},
        {"ROPE_GPTJ", KVB_ROPE_GPTJ}, {"DEVIATION_K", KVB_DEVIATION_K},
        {"DEVIATION_V", KVB_DEVIATION_V}, {"DEVIATION_KV", KVB_DEVIATION_KV},
        {"TIER_HOST", KVB_TIER_HOST}, {"TIER_DEVICE", KVB_TIER_DEVICE},
        {"LOG_DEBUG", KVB_LOG_DEBUG}, {"LOG_INFO", KVB_LOG_INFO},
        {"LOG_WARNING", KVB_LOG_WARNING}, {"LOG_ERROR", KVB_LOG_ERROR},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) {
            return -1;
        }
    }
    kvb_set_log(log_sink, NULL, KVB_LOG_WARNING);
    return 0;
}

/* GC traversal of the module state (types and exceptions refer back to the
 * module through their heap-type module reference). */
static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = get_state(m);
    Py_VISIT(st->error);
    Py_VISIT(st->invalid_error);
    Py_VISIT(st->nomem_error);
    Py_VISIT(st->unsupported_error);
    Py_VISIT(st->cuda_error);
    Py_VISIT(st->notfound_error);
    Py_VISIT(st->internal_error);
    Py_VISIT(st->connector_type);
    Py_VISIT(st->request_type);
    Py_VISIT(st->layout_type);
    return 0;
}

/* Drops the module state's references. */
static int module_clear(PyObject *m)
{
    module_state *st = get_state(m);
    Py_CLEAR(st->error);
    Py_CLEAR(st->invalid_error);
    Py_CLEAR(st->nomem_error);
    Py_CLEAR(st->unsupported_error);
    Py_CLEAR(st->cuda_error);
    Py_CLEAR(st->notfound_error);
    Py_CLEAR(st->internal_error);
    Py_CLEAR(st->connector_type);
    Py_CLEAR(st->request_type);
    Py_CLEAR(st->layout_type);
    return 0;
}

/* Frees the module: restores libkvblend's default stderr log sink so no C
 * thread calls into a dying interpreter, then clears the state. */
static void module_free(void *m)
{
    kvb_set_log(NULL, NULL, KVB_LOG_WARNING);
    module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL}};

static struct PyModuleDef kvblend_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvblend._kvblend",
    .m_doc = "Thin CPython bindings of libkvblend (CacheBlend KV blending).",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

/* Module entry point (multi-phase initialisation). */
PyMODINIT_FUNC PyInit__kvblend(void);
PyMODINIT_FUNC PyInit__kvblend(void)
{
    return PyModuleDef_Init(&kvblend_module);
}
