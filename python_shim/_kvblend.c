/*
 * _kvblend.c: the CPython extension over libkvblend (module kvblend._kvblend).
 *
 * It binds what has a lifetime or calls back into Python: the Connector
 * type and its Requests (begin, then the hooks vLLM calls per layer) and
 * the log sink.  Everything else goes through ctypes in the same library,
 * declared once in kvblend/_clib.py: the stateless functions (ops over raw
 * pointers, hashing, segmenting, the configuration, the tiers' lookup-only
 * view) and the calls on a live connector through its _handle (lookup,
 * separator, statistics), which kvblend.Connector wraps with it.  They
 * raise through raise_status() here, so one table maps C statuses to
 * exceptions.
 *
 * Tensors arrive as integers (data_ptr()); token ids, spans and RoPE
 * frequencies as one flat int32 / int64 / float32 buffer (kvblend.Connector
 * converts anything else first); the configuration and the paged layout as
 * the bytes of a kvb_config / kvb_paged_layout (kvblend._clib).
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

/* set_log_level(level): minimum level (LOG_DEBUG..LOG_ERROR) of C log
 * lines forwarded to the "kvblend" logger; kvblend._clib takes names. */
static PyObject *mod_set_log_level(PyObject *m, PyObject *arg)
{
    long lvl = PyLong_Check(arg) ? PyLong_AsLong(arg) : -1;
    if (lvl < KVB_LOG_DEBUG || lvl > KVB_LOG_ERROR) {
        PyErr_Clear();
        return raise_invalid(get_state(m), "log level %R is not one of "
                             "LOG_DEBUG..LOG_ERROR (0..3)", arg);
    }
    kvb_set_log(log_sink, NULL, (kvb_log_level)lvl);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Buffers                                                                   */
/* ------------------------------------------------------------------------ */

/* The flat arrays the library takes: token ids, spans ((start, end) pairs)
 * and RoPE frequencies.  kvblend.Connector converts anything else
 * (kvblend._clib.int32_tokens, span_array, float32_array) before calling. */
enum { BUF_INT32, BUF_INT64, BUF_FLOAT32 };
static const struct {
    Py_ssize_t itemsize;
    const char *codes; /* accepted struct format codes */
    const char *name;
} buffer_kinds[] = {
    [BUF_INT32] = {4, "il", "int32"},
    [BUF_INT64] = {8, "lqn", "int64"},
    [BUF_FLOAT32] = {4, "f", "float32"},
};

/*
 * Borrows `obj` as a flat C-contiguous buffer of buffer_kinds[kind]
 * (None gives an empty view when `none_ok`).  *n is its element count.
 * Returns 0 (release *view with release()), or -1 with a TypeError naming
 * `what` and view->obj NULL.
 */
static int typed_buffer(PyObject *obj, int kind, int none_ok,
                        const char *what, Py_buffer *view, int64_t *n)
{
    view->obj = NULL;
    *n = 0;
    if (obj == Py_None && none_ok) {
        view->buf = NULL;
        return 0;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
        == 0) {
        const char *f = view->format ? view->format : "B";
        f += *f == '@' || *f == '=' || *f == '<';
        if (view->ndim <= 1 && view->itemsize == buffer_kinds[kind].itemsize
            && strlen(f) == 1 && strchr(buffer_kinds[kind].codes, *f)) {
            *n = (int64_t)(view->len / view->itemsize);
            return 0;
        }
        PyBuffer_Release(view);
    }
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "%s must be a flat %s buffer, not %.100s "
                 "(kvblend.Connector converts sequences)", what,
                 buffer_kinds[kind].name, Py_TYPE(obj)->tp_name);
    return -1;
}

/* Releases a buffer view that may never have been taken. */
static void release(Py_buffer *view)
{
    if (view->obj != NULL) {
        PyBuffer_Release(view);
    }
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
 * Connector(config, num_layers, num_q_heads, num_kv_heads, head_size, dtype,
 *           rotary_dim, rope_style, inv_freq, attention_factor=1.0,
 *           device=-1, architecture=None): creates the C connector with its
 * store.  config is the bytes of a validated kvb_config (kvblend._clib
 * parse_config); inv_freq a float32 buffer of rotary_dim/2 frequencies
 * (copied by the library).  The log level becomes the configured one.
 * kvblend.Connector wraps it and takes the variables instead.
 */
static PyObject *connector_new(PyTypeObject *type, PyObject *args,
                               PyObject *kwds)
{
    static char *kwlist[] = {"config", "num_layers", "num_q_heads",
                             "num_kv_heads", "head_size", "dtype",
                             "rotary_dim", "rope_style", "inv_freq",
                             "attention_factor", "device", "architecture",
                             NULL};
    module_state *st = PyType_GetModuleState(type);
    PyObject *inv_obj;
    Py_buffer cfg = {0}, inv = {0};
    kvb_model_desc md = {0};
    int dtype, style, device = -1;
    int64_t n;
    md.rope.attention_factor = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "y*iiiiiiiO|fiz:Connector", kwlist, &cfg,
            &md.num_layers, &md.num_q_heads, &md.num_kv_heads, &md.head_size,
            &dtype, &md.rope.rotary_dim, &style, &inv_obj,
            &md.rope.attention_factor, &device, &md.architecture)) {
        return NULL;
    }
    md.dtype = (kvb_dtype)dtype;
    md.rope.style = (kvb_rope_style)style;
    kvb_connector *conn = NULL;
    kvb_status s = KVB_ERR_INVALID;
    if (cfg.len != (Py_ssize_t)sizeof(kvb_config)) {
        raise_invalid(st, "Connector(): config has %zd bytes, a kvb_config "
                      "%zu (use kvblend._clib.parse_config)", cfg.len,
                      sizeof(kvb_config));
    } else if (typed_buffer(inv_obj, BUF_FLOAT32, 0, "inv_freq", &inv, &n)
               < 0) {
        /* TypeError set */
    } else if (md.rope.rotary_dim > 0 && n != md.rope.rotary_dim / 2) {
        raise_invalid(st, "inv_freq has %lld entries; rotary_dim = %d needs "
                      "rotary_dim/2 = %d", (long long)n,
                      (int)md.rope.rotary_dim, (int)(md.rope.rotary_dim / 2));
    } else {
        md.rope.inv_freq = inv.buf;
        Py_BEGIN_ALLOW_THREADS
        s = kvb_connector_create(cfg.buf, &md, device, &conn);
        Py_END_ALLOW_THREADS
        if (s != KVB_OK) {
            set_error_from_status(st, s);
        }
    }
    ConnectorObject *self = s == KVB_OK
        ? (ConnectorObject *)type->tp_alloc(type, 0) : NULL;
    if (self != NULL) {
        self->conn = conn;
        self->device = device;
        kvb_set_log(log_sink, NULL, ((const kvb_config *)cfg.buf)->log_level);
    } else {
        kvb_connector_free(conn);
    }
    release(&inv);
    release(&cfg);
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
    int64_t n, ns;
    kvb_request *req = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OLpK:begin", kwlist,
                                     &tok_obj, &spans_obj, &blend_end, &save,
                                     &tenant)
        || typed_buffer(tok_obj, BUF_INT32, 0, "tokens", &tv, &n) < 0
        || typed_buffer(spans_obj, BUF_INT64, 1, "spans", &sv, &ns) < 0) {
        goto done;
    }
    if (ns % 2 != 0) {
        raise_invalid(st, "spans must hold (start, end) pairs: an even "
                      "number of int64, not %lld", (long long)ns);
        goto done;
    }
    kvb_status s;
    Py_BEGIN_ALLOW_THREADS
    s = kvb_request_begin(self->conn, (uint64_t)tenant, tv.buf, n, sv.buf,
                          ns / 2, (int64_t)blend_end, save, &req);
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

/* Getter of Connector.device, .tier_key (closure 1), .fingerprint (2),
 * ._handle (3: the kvb_connector's address, for kvblend._clib's calls). */
static PyObject *connector_get(ConnectorObject *self, void *closure)
{
    switch ((intptr_t)closure) {
    case 3:
        return PyLong_FromVoidPtr(self->conn);
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
    METHOD(connector, begin, METH_VARARGS | METH_KEYWORDS,
           "begin(tokens, spans=None, blend_end=-1, save=True, namespace=0)"
           "\n--\n\nStarts one prefill and returns its Request."),
    {NULL, NULL, 0, NULL}};

static PyGetSetDef connector_getset[] = {
    {"device", (getter)connector_get, NULL,
     "-1 for the CPU path, else the CUDA device ordinal", (void *)0},
    {"tier_key", (getter)connector_get, NULL,
     "the key of this model and shard in the disk and remote tiers",
     (void *)1},
    {"fingerprint", (getter)connector_get, NULL,
     "the model's fingerprint (architecture, shape, dtype, RoPE)", (void *)2},
    {"_handle", (getter)connector_get, NULL,
     "the kvb_connector's address (kvblend._clib)", (void *)3},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot connector_slots[] = {
    {Py_tp_new, connector_new},
    {Py_tp_dealloc, connector_dealloc},
    {Py_tp_methods, connector_methods},
    {Py_tp_getset, connector_getset},
    {Py_tp_doc,
     "Connector(config, num_layers, num_q_heads, num_kv_heads, head_size, "
     "dtype, rotary_dim, rope_style, inv_freq, attention_factor=1.0, "
     "device=-1, architecture=None)\n\nBlending state of one model: a "
     "chunk store and the separator (wrapped by kvblend.Connector)."},
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
    METHOD(mod, set_log_level, METH_O, "set_log_level(level)\n--\n\n"
           "Minimum level (0..3) of C log lines forwarded to "
           "logging.getLogger('kvblend')."),
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
        /* the sizes kvblend._clib's ctypes structures must have */
        {"SIZEOF_CONFIG", sizeof(kvb_config)},
        {"SIZEOF_SETTING", sizeof(kvb_setting)},
        {"SIZEOF_PAGED_LAYOUT", sizeof(kvb_paged_layout)},
        {"SIZEOF_ROPE", sizeof(kvb_rope)},
        {"SIZEOF_STORE_STATS", sizeof(kvb_store_stats)},
        {"SIZEOF_STORE_EVENT", sizeof(kvb_store_event)},
        {"SIZEOF_TIER_STATS", sizeof(kvb_tier_stats)},
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
