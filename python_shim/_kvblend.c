/*
 * _kvblend.c: the CPython extension over libkvblend (module kvblend._kvblend).
 *
 * It binds what has a lifetime or calls back into Python: the Connector and
 * its Requests (the hooks vLLM calls per layer), the configuration as a
 * dict, the lower tiers' lookup-only view, and the log sink.  The stateless
 * functions (ops over raw pointers, hashing, segmenting) are declared once
 * in kvblend/_clib.py and called through ctypes in the same library; they
 * raise through raise_status() here, so one table maps C statuses to
 * exceptions.
 *
 * Tensors arrive as integers (data_ptr()); token ids, spans and RoPE
 * frequencies as one flat int32 / int64 / float32 buffer (anything else is
 * converted by kvblend._clib first); the paged layout as the bytes of a
 * kvb_paged_layout (kvblend._clib.Layout).
 * The GIL is released around every call that may take a lock, start
 * threads or log, because the log sink takes the GIL from any thread.
 * Multi-phase initialisation: exceptions and types live in module state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"

/* ------------------------------------------------------------------------ */
/* Module state and errors                                                   */
/* ------------------------------------------------------------------------ */

#define NUM_ERRORS (KVB_ERR_IO + 1)

/* The exception of each kvb_status (index 0: the base kvblend.Error; a
 * status without a name of its own raises the base). */
static const struct {
    const char *name;
    PyObject **base; /* the builtin exception it also derives from */
    const char *doc;
} error_table[NUM_ERRORS] = {
    [0] = {"Error", NULL, "Base class of every error raised by kvblend."},
    [KVB_ERR_INVALID] = {"InvalidError", &PyExc_ValueError,
                         "A bad argument or configuration value."},
    [KVB_ERR_NOMEM] = {"NoMemoryError", &PyExc_MemoryError,
                       "An allocation failed."},
    [KVB_ERR_UNSUPPORTED] = {"UnsupportedError", &PyExc_NotImplementedError,
                             "A dtype, layout or feature is not supported."},
    [KVB_ERR_CUDA] = {"CudaError", &PyExc_RuntimeError,
                      "A CUDA runtime call failed."},
    [KVB_ERR_NOT_FOUND] = {"NotFoundError", &PyExc_LookupError,
                           "A looked-up object is missing."},
    [KVB_ERR_INTERNAL] = {"InternalError", &PyExc_RuntimeError,
                          "An internal invariant failed (a bug in kvblend)."},
};

typedef struct {
    PyObject *errors[NUM_ERRORS]; /* by kvb_status; NULL = the base */
    PyTypeObject *connector_type;
    PyTypeObject *request_type;
} module_state;

static struct PyModuleDef kvblend_module;

/* Returns the state of the module `m` (never NULL for this module). */
static inline module_state *get_state(PyObject *m)
{
    return (module_state *)PyModule_GetState(m);
}

/* Returns the module state reached from an instance of one of this
 * module's heap types (not subclassable, so Py_TYPE(self) is ours). */
static inline module_state *state_of(PyObject *self)
{
    return (module_state *)PyType_GetModuleState(Py_TYPE(self));
}

/*
 * Raises the kvblend exception of `status` with this thread's
 * kvb_last_error() (kvb_status_str() when empty) as the message.  Must run
 * on the thread that made the failing call.  Always returns NULL.
 */
static PyObject *set_error_from_status(module_state *st, kvb_status status)
{
    PyObject *exc = st->errors[0];
    if ((int)status > 0 && (int)status < NUM_ERRORS
        && st->errors[status] != NULL) {
        exc = st->errors[status];
    }
    const char *msg = kvb_last_error();
    PyErr_SetString(exc, msg != NULL && msg[0] != '\0'
                             ? msg : kvb_status_str(status));
    return NULL;
}

/* Raises kvblend.InvalidError (a ValueError) with a formatted message for
 * bad input found in the extension itself; returns NULL. */
static PyObject *raise_invalid(module_state *st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL) {
        PyErr_SetObject(st->errors[KVB_ERR_INVALID], msg);
        Py_DECREF(msg);
    }
    return NULL;
}

/* Returns None for KVB_OK, else raises the status's exception. */
static PyObject *none_or_error(module_state *st, kvb_status s)
{
    if (s != KVB_OK) {
        return set_error_from_status(st, s);
    }
    Py_RETURN_NONE;
}

/* raise_status(status): raises the exception of a failed kvb_status from a
 * call made through ctypes on this thread (kvblend._clib's errcheck). */
static PyObject *mod_raise_status(PyObject *m, PyObject *arg)
{
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return none_or_error(get_state(m), (kvb_status)s);
}

/* ------------------------------------------------------------------------ */
/* Logging: C log lines go to logging.getLogger("kvblend")                   */
/* ------------------------------------------------------------------------ */

/* The "kvblend" logger, looked up once under the GIL.  Process-wide like
 * libkvblend's sink itself: a C thread may call the sink after this module
 * object is gone, so the reference is never released. */
static PyObject *kvb_logger;

/*
 * The log sink installed in libkvblend, called from any thread without the
 * library's lock held: takes the GIL, keeps that thread's pending
 * exception, and calls logger.log(level, "%s", msg).  A failing handler is
 * reported as unraisable.  The sink is removed at exit (mod_at_exit), after
 * which libkvblend writes to stderr.
 */
static void log_sink(kvb_log_level level, const char *msg, void *user)
{
    (void)user;
    if (!Py_IsInitialized()) {
        fprintf(stderr, "kvblend: %s\n", msg);
        return;
    }
    static const int py_levels[] = {10, 20, 30, 40};
    int py_level = (int)level >= 0 && (int)level <= 3 ? py_levels[level] : 40;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *type, *value, *tb, *res = NULL;
    PyErr_Fetch(&type, &value, &tb);
    if (kvb_logger == NULL) {
        PyObject *logging = PyImport_ImportModule("logging");
        kvb_logger = logging ? PyObject_CallMethod(logging, "getLogger", "s",
                                                   "kvblend")
                             : NULL;
        Py_XDECREF(logging);
    }
    if (kvb_logger != NULL) {
        res = PyObject_CallMethod(kvb_logger, "log", "iss", py_level, "%s",
                                  msg);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable(NULL);
    }
    Py_XDECREF(res);
    PyErr_Restore(type, value, tb);
    PyGILState_Release(gil);
}

/* _at_exit(): registered with atexit; hands C log lines back to stderr
 * before the interpreter finalizes. */
static PyObject *mod_at_exit(PyObject *m, PyObject *unused)
{
    kvb_set_log(NULL, NULL, KVB_LOG_WARNING);
    Py_RETURN_NONE;
}

/* set_log_level(level): minimum level of C log lines forwarded to the
 * "kvblend" logger: "debug", "info", "warning", "error" or 0..3. */
static PyObject *mod_set_log_level(PyObject *m, PyObject *arg)
{
    static const char *names[] = {"debug", "info", "warning", "error"};
    long lvl = -1;
    if (PyUnicode_Check(arg)) {
        for (long i = 0; i < 4; i++) {
            if (PyUnicode_CompareWithASCIIString(arg, names[i]) == 0) {
                lvl = i;
            }
        }
    } else if (PyLong_Check(arg)) {
        lvl = PyLong_AsLong(arg);
        if (lvl == -1 && PyErr_Occurred()) {
            PyErr_Clear();
        }
    }
    if (lvl < 0 || lvl > 3) {
        return raise_invalid(get_state(m), "log level %R is not one of "
                             "'debug', 'info', 'warning', 'error' (or 0..3)",
                             arg);
    }
    kvb_set_log(log_sink, NULL, (kvb_log_level)lvl);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Buffers                                                                   */
/* ------------------------------------------------------------------------ */

/* The flat arrays the library takes, and the kvblend._clib function that
 * converts anything else (a list, a tensor, another integer width). */
enum { BUF_INT32, BUF_INT64, BUF_FLOAT32 };
static const struct {
    Py_ssize_t itemsize;
    const char *codes;   /* accepted struct format codes */
    const char *convert; /* kvblend._clib.<convert>(obj, what) */
} buffer_kinds[] = {
    [BUF_INT32] = {4, "il", "int32_tokens"},
    [BUF_INT64] = {8, "lqn", "span_array"},
    [BUF_FLOAT32] = {4, "f", "float32_array"},
};

/*
 * Borrows `obj` as a C-contiguous 1-D buffer of buffer_kinds[kind] (an
 * array.array or numpy array of that type is used as is); anything else
 * goes through the kind's kvblend._clib converter, whose errors name
 * `what`, the index and the value.  Returns 0 (release *view with
 * release()), or -1 with an exception set and view->obj NULL.
 */
static int typed_buffer(PyObject *obj, int kind, const char *what,
                        Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
        == 0) {
        const char *f = view->format ? view->format : "B";
        f += *f == '@' || *f == '=' || *f == '<';
        if (view->ndim <= 1 && view->itemsize == buffer_kinds[kind].itemsize
            && strlen(f) == 1 && strchr(buffer_kinds[kind].codes, *f)) {
            return 0;
        }
        PyBuffer_Release(view);
    }
    PyErr_Clear();
    PyObject *clib = PyImport_ImportModule("kvblend._clib");
    PyObject *flat = clib == NULL ? NULL
        : PyObject_CallMethod(clib, buffer_kinds[kind].convert, "Os", obj,
                              what);
    int rc = flat ? PyObject_GetBuffer(flat, view, PyBUF_C_CONTIGUOUS) : -1;
    Py_XDECREF(clib);
    Py_XDECREF(flat); /* the view holds its own reference */
    if (rc < 0) {
        view->obj = NULL;
    }
    return rc;
}

/* Token ids of `obj` (int32 buffer) as *tok / *n, borrowed from *view. */
static int tokens_arg(PyObject *obj, const char *what, Py_buffer *view,
                      const int32_t **tok, int64_t *n)
{
    if (typed_buffer(obj, BUF_INT32, what, view) < 0) {
        return -1;
    }
    *tok = view->buf;
    *n = (int64_t)(view->len / 4);
    return 0;
}

/* Spans of `obj` (None, or an int64 buffer of start, end pairs) as
 * *spans / *n, borrowed from *view (view->obj NULL for None). */
static int spans_arg(PyObject *obj, Py_buffer *view, const kvb_span **spans,
                     int64_t *n)
{
    *spans = NULL;
    *n = 0;
    view->obj = NULL;
    if (obj == Py_None) {
        return 0;
    }
    if (typed_buffer(obj, BUF_INT64, "spans", view) < 0) {
        return -1;
    }
    if (view->len % 16 != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "spans must hold (start, end) "
                        "pairs: an even number of int64");
        return -1;
    }
    *spans = view->buf;
    *n = (int64_t)(view->len / 16);
    return 0;
}

/* Releases a buffer view that may never have been taken. */
static void release(Py_buffer *view)
{
    if (view->obj != NULL) {
        PyBuffer_Release(view);
    }
}

/* ------------------------------------------------------------------------ */
/* Configuration                                                             */
/* ------------------------------------------------------------------------ */

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

/* Returns a new list of the `n` ints of `ints`, or (ints NULL) of the `n`
 * floats of `floats`. */
static PyObject *list_of(const int32_t *ints, const float *floats, int n)
{
    PyObject *l = PyList_New(n);
    for (int i = 0; l != NULL && i < n; i++) {
        PyObject *x = ints != NULL
            ? PyLong_FromLong(ints[i])
            : PyFloat_FromDouble(f32_to_short_double(floats[i]));
        if (x == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, x);
    }
    return l;
}

/* Returns a new dict with one key per kvb_config field, walking the
 * settings table (kvb_config_get); an unset float list is None. */
static PyObject *config_to_dict(const kvb_config *c)
{
    PyObject *d = PyDict_New();
    kvb_setting v;
    for (int i = 0; d != NULL && kvb_config_get(c, i, &v) == KVB_OK; i++) {
        PyObject *x;
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
            x = list_of(v.ints, NULL, v.n);
            break;
        case KVB_SETTING_FLOAT_LIST:
            x = v.n > 0 ? list_of(NULL, v.floats, v.n) : Py_NewRef(Py_None);
            break;
        default:
            continue; /* checked only: no field */
        }
        if (x == NULL || PyDict_SetItemString(d, v.key, x) < 0) {
            Py_CLEAR(d);
        }
        Py_XDECREF(x);
    }
    return d;
}

/*
 * Builds a kvb_config from `items` (None, a mapping or an iterable of
 * pairs of variable name -> value): defaults, kvb_config_set per item, then
 * kvb_config_validate.  Values are str, or int, float and bool converted
 * with str().  Returns 0, or -1 with InvalidError (the C message names the
 * variable) or TypeError set.
 */
static int config_from_items(module_state *st, PyObject *items,
                             kvb_config *cfg)
{
    kvb_config_init(cfg);
    PyObject *d = items != Py_None
        ? PyObject_CallOneArg((PyObject *)&PyDict_Type, items) : PyDict_New();
    if (d == NULL) {
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    kvb_status s = KVB_OK;
    while (s == KVB_OK && PyDict_Next(d, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)
            || !(PyUnicode_Check(value) || PyLong_Check(value)
                 || PyFloat_Check(value))) {
            PyErr_Format(PyExc_TypeError, "configuration names must be str "
                         "and values str, int, float or bool, not %R=%R",
                         key, value);
            goto fail;
        }
        PyObject *sval = PyObject_Str(value);
        Py_ssize_t klen, vlen;
        const char *k = PyUnicode_AsUTF8AndSize(key, &klen);
        const char *v = sval ? PyUnicode_AsUTF8AndSize(sval, &vlen) : NULL;
        int bad = k == NULL || (Py_ssize_t)strlen(k) != klen ? 1
                  : v == NULL ? 2 /* os.environ's non-UTF-8 bytes arrive
                                   * as lone surrogates */
                  : (Py_ssize_t)strlen(v) != vlen ? 3 : 0;
        if (bad != 0) {
            PyErr_Clear();
            if (bad == 1) {
                raise_invalid(st, "configuration name %R is not a name (NUL "
                              "character or not UTF-8)", key);
            } else if (bad == 2) {
                raise_invalid(st, "%s: the value is not valid UTF-8", k);
            } else {
                raise_invalid(st, "%s=%R: the value contains a NUL "
                              "character", k, sval);
            }
            Py_XDECREF(sval);
            goto fail;
        }
        s = kvb_config_set(cfg, k, v);
        Py_DECREF(sval);
    }
    Py_DECREF(d);
    if (s == KVB_OK) {
        s = kvb_config_validate(cfg);
    }
    return s == KVB_OK ? 0 : (set_error_from_status(st, s), -1);
fail:
    Py_DECREF(d);
    return -1;
}

/* config_parse(items) -> dict: validates a mapping of LMCACHE_* /
 * KVBLEND_* variables exactly as a Connector will. */
static PyObject *mod_config_parse(PyObject *m, PyObject *items)
{
    kvb_config cfg;
    if (config_from_items(get_state(m), items, &cfg) < 0) {
        return NULL;
    }
    return config_to_dict(&cfg);
}

/* config_from_env() -> dict: kvb_config_from_env over the environment. */
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
/* Lower tiers: counters, and the scheduler's lookup-only view               */
/* ------------------------------------------------------------------------ */

#define TIERS_CAPSULE "kvblend.tiers"

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
    return t != NULL ? tiers_stats_dict(get_state(m), t) : NULL;
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
 *           device=-1, architecture=None): parses config_items like
 * config_parse and creates the C connector with its store.  inv_freq is a
 * float32 buffer of rotary_dim/2 frequencies (copied by the library).  The
 * log level becomes the configured KVBLEND_LOG_LEVEL.
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
    kvb_model_desc md = {0};
    int dtype, style, device = -1;
    md.rope.attention_factor = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OiiiiiiiO|fiz:Connector", kwlist, &items,
            &md.num_layers, &md.num_q_heads, &md.num_kv_heads, &md.head_size,
            &dtype, &md.rope.rotary_dim, &style, &inv_obj,
            &md.rope.attention_factor, &device, &md.architecture)) {
        return NULL;
    }
    md.dtype = (kvb_dtype)dtype;
    md.rope.style = (kvb_rope_style)style;
    kvb_config cfg;
    Py_buffer inv;
    if (config_from_items(st, items, &cfg) < 0
        || typed_buffer(inv_obj, BUF_FLOAT32, "inv_freq", &inv) < 0) {
        return NULL;
    }
    if (md.rope.rotary_dim > 0 && inv.len / 4 != md.rope.rotary_dim / 2) {
        PyBuffer_Release(&inv);
        return raise_invalid(st, "inv_freq has %zd entries; rotary_dim = %d "
                             "needs rotary_dim/2 = %d", inv.len / 4,
                             (int)md.rope.rotary_dim,
                             (int)(md.rope.rotary_dim / 2));
    }
    md.rope.inv_freq = inv.buf;
    kvb_connector *conn = NULL;
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_connector_create(&cfg, &md, device, &conn);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&inv);
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
    Py_buffer view;
    const int32_t *sep;
    int64_t n;
    if (tokens_arg(arg, "separator", &view, &sep, &n) < 0) {
        return NULL;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_connector_set_separator(self->conn, sep, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return none_or_error(state_of((PyObject *)self), s);
}

/* lookup(tokens, spans=None, namespace=0) -> ([(start, end, hit)],
 * reuse_end): which segments are stored; no side effects. */
static PyObject *connector_lookup(ConnectorObject *self, PyObject *args,
                                  PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "spans", "namespace", NULL};
    module_state *st = state_of((PyObject *)self);
    PyObject *tok_obj, *spans_obj = Py_None, *res = NULL, *l = NULL;
    unsigned long long tenant = 0;
    Py_buffer tv = {0}, sv = {0};
    const int32_t *tok;
    const kvb_span *spans;
    kvb_span *segs = NULL;
    uint8_t *hit = NULL;
    int64_t n, ns, nseg = 0, reuse_end = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OK:lookup", kwlist,
                                     &tok_obj, &spans_obj, &tenant)
        || tokens_arg(tok_obj, "tokens", &tv, &tok, &n) < 0
        || spans_arg(spans_obj, &sv, &spans, &ns) < 0) {
        goto done;
    }
    int64_t cap = spans != NULL ? ns : n / 2 + 1;
    cap = cap < 1 ? 1 : cap;
    segs = PyMem_Malloc(sizeof(kvb_span) * (size_t)cap);
    hit = PyMem_Malloc((size_t)cap);
    if (segs == NULL || hit == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_connector_lookup(self->conn, (uint64_t)tenant, tok, n, spans, ns,
                             segs, hit, cap, &nseg, &reuse_end);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        set_error_from_status(st, s);
        goto done;
    }
    l = PyList_New((Py_ssize_t)nseg);
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
    res = l != NULL ? Py_BuildValue("(NL)", l, (long long)reuse_end) : NULL;
done:
    release(&tv);
    release(&sv);
    PyMem_Free(segs);
    PyMem_Free(hit);
    return res;
}

/* begin(tokens, spans=None, blend_end=-1, save=True, namespace=0) ->
 * Request: the worker-side state of one prefill.  blend_end >= 0 is the
 * row count the scheduler promised the engine; < 0 uses the lookup's. */
static PyObject *connector_begin(ConnectorObject *self, PyObject *args,
                                 PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "spans", "blend_end", "save",
                             "namespace", NULL};
    module_state *st = state_of((PyObject *)self);
    PyObject *tok_obj, *spans_obj = Py_None;
    RequestObject *r = NULL;
    long long blend_end = -1;
    int save = 1;
    unsigned long long tenant = 0;
    Py_buffer tv = {0}, sv = {0};
    const int32_t *tok;
    const kvb_span *spans;
    int64_t n, ns;
    kvb_request *req = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OLpK:begin", kwlist,
                                     &tok_obj, &spans_obj, &blend_end, &save,
                                     &tenant)
        || tokens_arg(tok_obj, "tokens", &tv, &tok, &n) < 0
        || spans_arg(spans_obj, &sv, &spans, &ns) < 0) {
        goto done;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_request_begin(self->conn, (uint64_t)tenant, tok, n, spans, ns,
                          (int64_t)blend_end, save, &req);
    Py_END_ALLOW_THREADS
    if (s != KVB_OK) {
        set_error_from_status(st, s);
        goto done;
    }
    r = (RequestObject *)st->request_type->tp_alloc(st->request_type, 0);
    if (r == NULL) {
        kvb_request_finish(req, 0);
        goto done;
    }
    r->req = req;
    r->connector = Py_NewRef((PyObject *)self);
done:
    release(&tv);
    release(&sv);
    return (PyObject *)r;
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
    kvb_status s = KVB_OK;
    if (t != NULL) {
        Py_BEGIN_ALLOW_THREADS
        s = kvb_tiers_flush(t);
        Py_END_ALLOW_THREADS
    }
    return none_or_error(state_of((PyObject *)self), s);
}

/* set_shard(rank, world): the tensor-parallel shard of the tier key. */
static PyObject *connector_set_shard(ConnectorObject *self, PyObject *args)
{
    int rank, world;
    if (!PyArg_ParseTuple(args, "ii:set_shard", &rank, &world)) {
        return NULL;
    }
    return none_or_error(state_of((PyObject *)self),
                         kvb_connector_set_shard(self->conn, rank, world));
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
    return none_or_error(state_of((PyObject *)self),
                         kvb_connector_set_model_id(self->conn, buf,
                                                    (size_t)len));
}

/* store_clear(): removes every unpinned entry. */
static PyObject *connector_store_clear(ConnectorObject *self,
                                       PyObject *unused)
{
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_store_clear(kvb_connector_store(self->conn));
    Py_END_ALLOW_THREADS
    return none_or_error(state_of((PyObject *)self), s);
}

/* watch_store(enabled): starts or stops the store's event log. */
static PyObject *connector_watch_store(ConnectorObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0) {
        return NULL;
    }
    return none_or_error(state_of((PyObject *)self),
                         kvb_store_watch(kvb_connector_store(self->conn), on));
}

/* take_store_events() -> ([(hash, num_tokens, added), ...], lost): every
 * event recorded since the last call, oldest first. */
static PyObject *connector_take_store_events(ConnectorObject *self,
                                             PyObject *unused)
{
    enum { BATCH = 256 };
    kvb_store_event ev[BATCH];
    PyObject *list = PyList_New(0);
    int lost_any = 0;
    int64_t n = BATCH;
    while (list != NULL && n == BATCH) {
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
        for (int64_t i = 0; list != NULL && i < n; i++) {
            PyObject *t = Py_BuildValue(
                "(KLO)", (unsigned long long)ev[i].hash,
                (long long)ev[i].num_tokens,
                ev[i].kind == KVB_STORE_EVENT_ADDED ? Py_True : Py_False);
            if (t == NULL || PyList_Append(list, t) < 0) {
                Py_CLEAR(list);
            }
            Py_XDECREF(t);
        }
    }
    return list ? Py_BuildValue("(NO)", list, lost_any ? Py_True : Py_False)
                : NULL;
}

/* Getter of Connector.device, .tier_key (closure 1), .fingerprint (2). */
static PyObject *connector_get(ConnectorObject *self, void *closure)
{
    switch ((intptr_t)closure) {
    case 1:
        return PyLong_FromUnsignedLongLong(kvb_connector_tier_key(self->conn));
    case 2:
        return PyLong_FromUnsignedLongLong(
            kvb_connector_fingerprint(self->conn));
    default:
        return PyLong_FromLong(self->device);
    }
}

#define METHOD(prefix, name, flags, doc)                                    \
    {#name, (PyCFunction)(void (*)(void))prefix##_##name, flags, doc}
static PyMethodDef connector_methods[] = {
    METHOD(connector, set_separator, METH_O, "set_separator(tokens)\n--\n\n"
           "Sets the separator's token ids (int32 buffer)."),
    METHOD(connector, lookup, METH_VARARGS | METH_KEYWORDS,
           "lookup(tokens, spans=None, namespace=0)\n--\n\n"
           "Returns ([(start, end, hit), ...], reuse_end); no side effects."),
    METHOD(connector, begin, METH_VARARGS | METH_KEYWORDS,
           "begin(tokens, spans=None, blend_end=-1, save=True, namespace=0)"
           "\n--\n\nStarts one prefill and returns its Request."),
    METHOD(connector, store_stats, METH_NOARGS, "store_stats()\n--\n\n"
           "Returns the store's counters as a dict."),
    METHOD(connector, store_clear, METH_NOARGS, "store_clear()\n--\n\n"
           "Removes every unpinned entry."),
    METHOD(connector, tier_stats, METH_NOARGS, "tier_stats()\n--\n\n"
           "The disk and remote tiers' counters, or None without them."),
    METHOD(connector, flush_tiers, METH_NOARGS, "flush_tiers()\n--\n\n"
           "Waits until queued disk/remote writes are done."),
    METHOD(connector, set_shard, METH_VARARGS, "set_shard(rank, world)\n--\n"
           "\nDeclares the tensor-parallel shard this connector stores."),
    METHOD(connector, set_model_id, METH_O, "set_model_id(digest)\n--\n\n"
           "Mixes an identity of the model's weights (bytes) into the tier "
           "key."),
    METHOD(connector, watch_store, METH_O, "watch_store(enabled)\n--\n\n"
           "Starts or stops the store's event log."),
    METHOD(connector, take_store_events, METH_NOARGS,
           "take_store_events()\n--\n\nReturns ([(hash, num_tokens, added), "
           "...], lost) since the last call."),
    {NULL, NULL, 0, NULL}};

static PyGetSetDef connector_getset[] = {
    {"device", (getter)connector_get, NULL,
     "-1 for the CPU path, else the CUDA device ordinal", (void *)0},
    {"tier_key", (getter)connector_get, NULL,
     "the key of this model and shard in the disk and remote tiers",
     (void *)1},
    {"fingerprint", (getter)connector_get, NULL,
     "the model's fingerprint (architecture, shape, dtype, RoPE)", (void *)2},
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
        raise_invalid(state_of((PyObject *)self), "the request is finished");
    }
    return self->req;
}

/* Ends the request without committing if the owner never finished it,
 * then drops the connector reference (after: the request uses its store). */
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

/* Getter of Request.blend_end (rows [0, blend_end) are blended; closure 0)
 * and Request.finished (closure 1). */
static PyObject *request_get(RequestObject *self, void *closure)
{
    if (closure != NULL) {
        return PyBool_FromLong(self->req == NULL);
    }
    kvb_request *req = request_live(self);
    return req ? PyLong_FromLongLong(kvb_request_blend_end(req)) : NULL;
}

/* forced() -> bytes of length blend_end; 1 marks rows always recomputed. */
static PyObject *request_forced(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    if (req == NULL) {
        return NULL;
    }
    int64_t n = kvb_request_blend_end(req);
    const char *f = (const char *)kvb_request_forced(req);
    if (f == NULL || n <= 0) {
        f = "";
        n = 0;
    }
    return PyBytes_FromStringAndSize(f, (Py_ssize_t)n);
}

/* commit() -> number of segments made visible now (complete at every
 * layer); the request goes on. */
static PyObject *request_commit(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    int64_t n = 0;
    kvb_status s = KVB_OK;
    if (req == NULL) {
        return NULL;
    }
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
    int64_t a = 0, b = 0, c = 0;
    if (req == NULL) {
        return NULL;
    }
    kvb_status s = kvb_request_counts(req, &a, &b, &c);
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    return Py_BuildValue("(LLL)", (long long)a, (long long)b, (long long)c);
}

/* reused() -> [(start, num_tokens), ...]: the rows of each reused segment,
 * in prompt order. */
static PyObject *request_reused(RequestObject *self, PyObject *unused)
{
    kvb_request *req = request_live(self);
    int64_t n_hit = 0;
    if (req == NULL) {
        return NULL;
    }
    kvb_status s = kvb_request_counts(req, NULL, &n_hit, NULL);
    PyObject *out = s == KVB_OK ? PyList_New((Py_ssize_t)n_hit) : NULL;
    for (int64_t i = 0; out != NULL && i < n_hit; i++) {
        int64_t start = 0, len = 0;
        s = kvb_request_reused(req, i, &start, &len);
        PyObject *t = s == KVB_OK
            ? Py_BuildValue("(LL)", (long long)start, (long long)len) : NULL;
        if (t == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    if (s != KVB_OK) {
        return set_error_from_status(state_of((PyObject *)self), s);
    }
    return out;
}

/* O& converter of an address argument: an int in [0, 2^64); 0 is NULL. */
static int conv_ptr(PyObject *obj, void *out)
{
    unsigned long long u = PyLong_Check(obj)
        ? PyLong_AsUnsignedLongLong(obj) : (unsigned long long)-1;
    if (u == (unsigned long long)-1
        && (!PyLong_Check(obj) || PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_Format(PyLong_Check(obj) ? PyExc_ValueError : PyExc_TypeError,
                     "%R is not a valid address (an int in [0, 2**64))", obj);
        return 0;
    }
    *(void **)out = (void *)(uintptr_t)u;
    return 1;
}

/*
 * load_layer(layer, k_ptr, v_ptr, stream=0): fills the staging rows of
 * stored segments with layer `layer`'s KV, keys re-rotated.
 * save_layer(layer, layout, slots_ptr, n, stream=0): copies layer `layer`
 * of every reserved segment out of the paged cache into the store; layout
 * is a kvblend._clib.Layout (the bytes of a kvb_paged_layout), slots a
 * host int64 [n].  Addresses are ints; 0 is NULL.
 */
static PyObject *request_layer(RequestObject *self, PyObject *args, int save)
{
    int layer;
    Py_buffer lay = {0};
    void *k = NULL, *v = NULL, *slots = NULL, *stream = NULL;
    long long n = 0;
    int ok = save ? PyArg_ParseTuple(args, "iy*O&L|O&:save_layer", &layer,
                                     &lay, conv_ptr, &slots, &n, conv_ptr,
                                     &stream)
                  : PyArg_ParseTuple(args, "iO&O&|O&:load_layer", &layer,
                                     conv_ptr, &k, conv_ptr, &v, conv_ptr,
                                     &stream);
    kvb_request *req = ok ? request_live(self) : NULL;
    if (req != NULL && save
        && lay.len != (Py_ssize_t)sizeof(kvb_paged_layout)) {
        raise_invalid(state_of((PyObject *)self), "save_layer(): layout has "
                      "%zd bytes, a kvb_paged_layout %zu (use "
                      "kvblend._clib.Layout)", lay.len,
                      sizeof(kvb_paged_layout));
        req = NULL;
    }
    kvb_status s = KVB_OK;
    if (req != NULL) {
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        s = save ? kvb_request_save_layer(req, layer, lay.buf, slots, n,
                                          stream)
                 : kvb_request_load_layer(req, layer, k, v, stream);
        Py_END_ALLOW_THREADS
        self->busy--;
    }
    release(&lay);
    return req ? none_or_error(state_of((PyObject *)self), s) : NULL;
}

static PyObject *request_load_layer(RequestObject *self, PyObject *args)
{
    return request_layer(self, args, 0);
}

static PyObject *request_save_layer(RequestObject *self, PyObject *args)
{
    return request_layer(self, args, 1);
}

/* Ends the request (idempotent), committing its segments if `commit`.
 * Refused while a load/save of the same request runs on another thread. */
static PyObject *request_end(RequestObject *self, int commit)
{
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

/* finish(commit=True): ends the request (request_end). */
static PyObject *request_finish(RequestObject *self, PyObject *args,
                                PyObject *kwds)
{
    static char *kwlist[] = {"commit", NULL};
    int commit = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:finish", kwlist,
                                     &commit)) {
        return NULL;
    }
    return request_end(self, commit);
}

/* __enter__() returns the request itself. */
static PyObject *request_enter(RequestObject *self, PyObject *unused)
{
    return Py_NewRef((PyObject *)self);
}

/* __exit__(exc_type, exc, tb): finishes, committing only without an
 * exception; never suppresses it. */
static PyObject *request_exit(RequestObject *self, PyObject *const *args,
                              Py_ssize_t nargs)
{
    PyObject *r = request_end(self, nargs < 1 || args[0] == Py_None);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyMethodDef request_methods[] = {
    METHOD(request, forced, METH_NOARGS, "forced()\n--\n\n"
           "bytes of length blend_end; 1 = row always recomputed."),
    METHOD(request, commit, METH_NOARGS, "commit()\n--\n\n"
           "Commits the segments saved at every layer; returns their count."),
    METHOD(request, reused, METH_NOARGS, "reused()\n--\n\n"
           "[(start, num_tokens)] of each reused segment."),
    METHOD(request, counts, METH_NOARGS, "counts()\n--\n\n"
           "Returns (n_segments, n_hit, n_forced)."),
    METHOD(request, load_layer, METH_VARARGS,
           "load_layer(layer, k_ptr, v_ptr, stream=0)\n--\n\n"
           "Loads a layer's stored KV into staging [blend_end, H, D]."),
    METHOD(request, save_layer, METH_VARARGS,
           "save_layer(layer, layout, slots_ptr, n, stream=0)\n--\n\n"
           "Saves a layer of the reserved segments from the paged cache."),
    METHOD(request, finish, METH_VARARGS | METH_KEYWORDS,
           "finish(commit=True)\n--\n\nEnds the request (idempotent)."),
    {"__enter__", (PyCFunction)request_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))request_exit, METH_FASTCALL,
     NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef request_getset[] = {
    {"blend_end", (getter)request_get, NULL, "rows [0, blend_end) are "
     "blended", NULL},
    {"finished", (getter)request_get, NULL, "True once finish() ran",
     (void *)1},
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
    METHOD(mod, tiers_open, METH_O, "tiers_open(config_items)\n--\n\n"
           "Opens the disk/remote tiers the config names (None when none)."),
    METHOD(mod, tiers_contains, METH_VARARGS,
           "tiers_contains(tiers, key, hash)\n--\n\n"
           "Whether the disk or remote tier holds the entry."),
    METHOD(mod, tiers_stats, METH_O, "tiers_stats(tiers)\n--\n\n"
           "The tiers' counters."),
    METHOD(mod, set_log_level, METH_O, "set_log_level(level)\n--\n\n"
           "Minimum level of C log lines forwarded to "
           "logging.getLogger('kvblend')."),
    METHOD(mod, config_from_env, METH_NOARGS, "config_from_env()\n--\n\n"
           "The configuration of the process environment as a dict."),
    METHOD(mod, config_parse, METH_O, "config_parse(items)\n--\n\n"
           "Validates a mapping of LMCACHE_*/KVBLEND_* variables; returns "
           "the configuration as a dict."),
    METHOD(mod, raise_status, METH_O, "raise_status(status)\n--\n\n"
           "Raises the exception of a kvb_status failed on this thread."),
    METHOD(mod, at_exit, METH_NOARGS, "at_exit()\n--\n\n"
           "Hands C log lines back to stderr (registered with atexit)."),
    {NULL, NULL, 0, NULL}};
#undef METHOD

/* Module exec slot: creates the exceptions and types, the integer
 * constants, routes C log lines (WARNING and above) to the "kvblend"
 * logger, and registers _at_exit with atexit. */
static int module_exec(PyObject *m)
{
    module_state *st = get_state(m);
    for (int i = 0; i < NUM_ERRORS; i++) {
        if (error_table[i].name == NULL) {
            continue;
        }
        char qual[64];
        snprintf(qual, sizeof qual, "kvblend.%s", error_table[i].name);
        PyObject *bases = i == 0 ? NULL
            : PyTuple_Pack(2, st->errors[0], *error_table[i].base);
        if (i > 0 && bases == NULL) {
            return -1;
        }
        st->errors[i] = PyErr_NewExceptionWithDoc(qual, error_table[i].doc,
                                                  bases, NULL);
        Py_XDECREF(bases);
        if (st->errors[i] == NULL
            || PyModule_AddObjectRef(m, error_table[i].name, st->errors[i])
                   < 0) {
            return -1;
        }
    }
    st->connector_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &connector_spec, NULL);
    st->request_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        m, &request_spec, NULL);
    if (st->connector_type == NULL || st->request_type == NULL
        || PyModule_AddType(m, st->connector_type) < 0
        || PyModule_AddType(m, st->request_type) < 0) {
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
    PyObject *atexit = PyImport_ImportModule("atexit");
    PyObject *hook = PyObject_GetAttrString(m, "at_exit");
    PyObject *r = atexit && hook
        ? PyObject_CallMethod(atexit, "register", "O", hook) : NULL;
    Py_XDECREF(atexit);
    Py_XDECREF(hook);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    kvb_set_log(log_sink, NULL, KVB_LOG_WARNING);
    return 0;
}

/* GC traversal of the module state. */
static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = get_state(m);
    for (int i = 0; i < NUM_ERRORS; i++) {
        Py_VISIT(st->errors[i]);
    }
    Py_VISIT(st->connector_type);
    Py_VISIT(st->request_type);
    return 0;
}

/* Drops the module state's references. */
static int module_clear(PyObject *m)
{
    module_state *st = get_state(m);
    for (int i = 0; i < NUM_ERRORS; i++) {
        Py_CLEAR(st->errors[i]);
    }
    Py_CLEAR(st->connector_type);
    Py_CLEAR(st->request_type);
    return 0;
}

/* Frees the module: restores libkvblend's stderr log sink so no C thread
 * calls into a dying interpreter, then clears the state. */
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
    .m_doc = "CPython bindings of libkvblend's connector (CacheBlend KV "
             "blending); kvblend._clib binds its stateless functions.",
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
