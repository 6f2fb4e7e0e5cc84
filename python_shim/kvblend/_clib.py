"""libkvblend's functions, declared once and called through ctypes.

The extension ``kvblend._kvblend`` binds what has a lifetime or calls back
into Python: the C ``Connector``, its ``Request`` and the log sink.
Everything here takes only numbers, byte strings, public C structs and raw
pointers (the tensors' ``data_ptr()``, a live connector's ``_handle``), so
a signature table is the whole binding: the stateless ops, hashing and
segmenting, the configuration (``parse_config``, ``config_dict``), the
lower tiers' lookup-only view (``TiersView``) and the calls on a connector
that :class:`kvblend.Connector` makes.  The
functions are looked up in the extension's own handle, which resolves them
in the ``libkvblend.so`` it loaded: both sides share one library, one
thread-local last error, one log sink and one CPU thread count.  ctypes
releases the GIL around each call.

A non-zero ``kvb_status`` raises the extension's exception for it
(``raise_status``), carrying ``kvb_last_error()``'s sentence.
"""

from __future__ import annotations

import array
import ctypes
import functools
import itertools
from ctypes import POINTER, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_uint64, c_void_p
from collections.abc import Iterable

from . import _ext

_INT32 = (-2**31, 2**31 - 1)
_INT64 = (-2**63, 2**63 - 1)
_PTR = (0, 2**64 - 1)


class Layout(ctypes.Structure):
    """One layer of a paged KV cache: ``kvb_paged_layout`` of kvblend.h.

    Element (block b, token t, head h, dim d) of K is at ``k_ptr + (b *
    block_stride + t * token_stride + h * head_stride + d * dim_stride) *
    itemsize``; V likewise from ``v_ptr`` with the ``v_*`` strides (all four
    0: K's).  Built by keyword only; every field but the ``v_*`` strides is
    required, and a value that does not fit its C type is refused by name.
    The pointers are borrowed.
    """

    _fields_ = [("k_ptr", c_void_p), ("v_ptr", c_void_p), ("block_stride", c_int64),
                ("token_stride", c_int64), ("head_stride", c_int64), ("dim_stride", c_int64),
                ("num_blocks", c_int64), ("block_size", c_int64), ("num_kv_heads", c_int32),
                ("head_size", c_int32), ("dtype", c_int32), ("device", c_int32),
                ("v_block_stride", c_int64), ("v_token_stride", c_int64),
                ("v_head_stride", c_int64), ("v_dim_stride", c_int64)]

    def __init__(self, **fields: int) -> None:
        super().__init__()
        unknown = set(fields) - {name for name, _ in self._fields_}
        if unknown:
            raise TypeError(f"Layout() got unknown field(s) {sorted(unknown)}")
        for name, ctype in self._fields_:
            if name not in fields:
                if not name.startswith("v_") or ctype is c_void_p:
                    raise TypeError(f"Layout() misses field {name!r}")
                continue
            value = fields[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Layout field {name!r} must be an int, not {type(value).__name__}")
            (lo, hi), kind = {c_void_p: (_PTR, "an address"), c_int64: (_INT64, "int64"),
                              c_int32: (_INT32, "int32")}[ctype]
            if not lo <= value <= hi:
                raise ValueError(f"{value} is not a valid address" if ctype is c_void_p else
                                 f"Layout field {name!r} = {value} does not fit {kind}")
            setattr(self, name, value)


class Rope(ctypes.Structure):
    """``kvb_rope``: the rotary embedding of a model's keys (inv_freq borrowed)."""

    _fields_ = [("rotary_dim", c_int32), ("style", c_int), ("inv_freq", c_void_p),
                ("attention_factor", c_float)]


class Setting(ctypes.Structure):
    """``kvb_setting``: one row of the settings table and its value in a config."""

    _fields_ = [("name", c_char_p), ("key", c_char_p), ("type", c_int), ("flags", ctypes.c_uint),
                ("i", c_int64), ("f", ctypes.c_double), ("s", c_void_p), ("n", c_int),
                ("ints", POINTER(c_int32)), ("floats", POINTER(c_float))]


def as_dict(struct: ctypes.Structure) -> dict:
    """A structure's fields by name (a C struct of counters as a dict)."""
    return {name: getattr(struct, name) for name, _ in struct._fields_}


class StoreStats(ctypes.Structure):
    """``kvb_store_stats``: the chunk store's counters and sizes."""

    _fields_ = [("num_entries", c_int64), ("host_bytes", c_size_t), ("device_bytes", c_size_t)] + [
        (name, c_int64) for name in ("lookups", "hits", "inserts", "evictions", "rejected",
                                     "collisions", "promotions", "demotions", "corrupt")]


class StoreEvent(ctypes.Structure):
    """``kvb_store_event``: a segment added to or removed from the store."""

    _fields_ = [("hash", c_uint64), ("num_tokens", c_int64), ("kind", c_int32)]


class TierStats(ctypes.Structure):
    """``kvb_tier_stats``: one lower tier's counters."""

    _fields_ = [("enabled", c_int32)] + [
        (name, c_uint64 if name.startswith("bytes") else c_int64)
        for name in ("lookups", "hits", "misses", "errors", "corrupt", "writes", "write_errors",
                     "writes_dropped", "bytes_read", "bytes_written", "entries", "bytes")]

    def as_dict(self) -> dict:
        return {**as_dict(self), "enabled": bool(self.enabled)}


# The C sizes the extension reports for each structure declared here.
_SIZES = {"SIZEOF_PAGED_LAYOUT": Layout, "SIZEOF_ROPE": Rope, "SIZEOF_SETTING": Setting,
          "SIZEOF_STORE_STATS": StoreStats, "SIZEOF_STORE_EVENT": StoreEvent,
          "SIZEOF_TIER_STATS": TierStats}


class _Addr(c_void_p):
    """A pointer argument given as an int address (0 = NULL); any other
    value is refused before it can reach C."""

    @classmethod
    def from_param(cls, value):
        if value is None or isinstance(value, ctypes.Array):  # an array: its address
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"an address must be an int, not {type(value).__name__}")
        if not _PTR[0] <= value <= _PTR[1]:
            raise ValueError(f"{value} is not a valid address")
        return c_void_p(value)


_P, _I64P, _INTP = _Addr, POINTER(c_int64), POINTER(c_int)
_LAYOUT = POINTER(Layout)
# name: (result type, argument types); c_int results are a kvb_status.
_SIGNATURES = {
    "kvb_config_init": (c_int, [_P]),
    "kvb_config_set": (c_int, [_P, c_char_p, c_char_p]),
    "kvb_config_validate": (c_int, [_P]),
    "kvb_config_from_env": (c_int, [_P]),
    "kvb_config_get": (ctypes.c_uint, [_P, c_int, POINTER(Setting)]),  # NOT_FOUND ends the table
    "kvb_tiers_open_view": (c_int, [_P, POINTER(c_void_p)]),
    "kvb_tiers_free": (None, [_P]),
    "kvb_tiers_contains": (c_int, [_P, c_uint64, c_uint64, _INTP]),
    "kvb_tiers_flush": (c_int, [_P]),
    "kvb_tiers_get_stats": (c_int, [_P, POINTER(TierStats), POINTER(TierStats)]),
    "kvb_connector_store": (c_void_p, [_P]),
    "kvb_connector_tiers": (c_void_p, [_P]),
    "kvb_connector_set_shard": (c_int, [_P, c_int32, c_int32]),
    "kvb_connector_set_model_id": (c_int, [_P, c_char_p, c_size_t]),
    "kvb_connector_set_separator": (c_int, [_P, _P, c_int64]),
    "kvb_connector_lookup": (c_int, [_P, c_uint64, _P, c_int64, _P, c_int64, _P, _P, c_int64,
                                     _I64P, _I64P]),
    "kvb_store_get_stats": (c_int, [_P, POINTER(StoreStats)]),
    "kvb_store_clear": (c_int, [_P]),
    "kvb_store_watch": (c_int, [_P, c_int]),
    "kvb_store_take_events": (c_int, [_P, POINTER(StoreEvent), c_int64, _I64P, _INTP]),
    "kvb_last_error": (c_char_p, []),
    "kvb_version": (c_char_p, []),
    "kvb_has_cuda": (ctypes.c_uint, []),  # an int, not a kvb_status
    "kvb_cpu_set_threads": (c_int, [c_int]),
    "kvb_tier_key": (c_uint64, [c_uint64, c_int32, c_int32]),
    "kvb_hash_tokens_ns": (c_uint64, [_P, c_int64, c_uint64]),
    "kvb_namespace": (c_uint64, [c_char_p, c_size_t]),
    "kvb_segment_split": (c_int, [_P, c_int64, _P, c_int64, _P, c_int64, _I64P]),
    "kvb_segment_check": (c_int, [_P, c_int64, c_int64]),
    "kvb_cpu_gather": (c_int, [_LAYOUT, _P, c_int64, _P, _P]),
    "kvb_cpu_scatter": (c_int, [_LAYOUT, _P, c_int64, _P, _P]),
    "kvb_cpu_rerotate": (c_int, [_P, c_int64, c_int32, c_int32, c_int, POINTER(Rope), _P, _P]),
    "kvb_cpu_deviation": (c_int, [_P, _P, c_int64, c_int32, c_int32, c_int, _P]),
    "kvb_cpu_select": (c_int, [_P, _P, c_int64, c_int64, _P, _I64P]),
    "kvb_cpu_attention": (c_int, [_P, _P, c_int64, _P, _P, _P, c_int64, c_int32, c_int32, c_int32,
                                  c_float, c_int, _P]),
}
# The CUDA twins take the same arguments plus a stream (select: n_forced too);
# attention has no twin.
for _op in ("gather", "scatter", "rerotate", "deviation"):
    _res, _args = _SIGNATURES[f"kvb_cpu_{_op}"]
    _SIGNATURES[f"kvb_cuda_{_op}"] = (_res, _args + [_P])
_SIGNATURES["kvb_cuda_select"] = (c_int, [_P, _P, c_int64, c_int64, c_int64, _P, _P, _I64P])


def _check_status(status: int, func, args):
    """ctypes errcheck: raise the extension's exception for a failed call."""
    if status != 0:
        _ext.load().raise_status(status)
    return status


@functools.lru_cache(maxsize=None)
def lib() -> ctypes.CDLL:
    """The C library with every function of the table declared (loaded once).

    Raises ImportError when a structure declared here does not have the
    size the extension was compiled with (a header changed without this
    file)."""
    ext = _ext.load()
    for const, struct in _SIZES.items():
        if ctypes.sizeof(struct) != getattr(ext, const):
            raise ImportError(f"kvblend._clib.{struct.__name__} has {ctypes.sizeof(struct)} bytes, "
                              f"the C struct {getattr(ext, const)}: rebuild, or update _clib.py")
    handle = ctypes.CDLL(ext.__file__)
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = res, args
        if res is c_int:
            fn.errcheck = _check_status
    return handle


def _op(name: str, device: int):
    """The CPU op `name` for device -1, else its CUDA twin."""
    return getattr(lib(), f"kvb_{'cpu' if device < 0 else 'cuda'}_{name}")


# --- conversions ----------------------------------------------------------------

def int32_tokens(tokens, what: str = "tokens") -> array.array:
    """Token ids as one contiguous ``array('i')``, the form the library takes.

    Accepts a sequence of ints, a 1-D integer buffer (any width or
    signedness) or anything with ``tolist()`` (a tensor).  A str, a
    non-integer item (TypeError) or an id outside int32 (InvalidError) is
    refused naming `what`, the index and the value."""
    if isinstance(tokens, array.array) and tokens.typecode == "i":
        return tokens
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of int token ids, not {type(tokens).__name__}")
    flat = _buffer_ints(tokens, what)
    if flat is not None:
        tokens = flat
    elif hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    try:
        return array.array("i", tokens)
    except (TypeError, OverflowError) as exc:
        if not isinstance(tokens, Iterable):
            raise TypeError(f"{what} must be a sequence of ints or a 1-D integer buffer, "
                            f"not {type(tokens).__name__}") from None
        for i, t in enumerate(tokens):
            if isinstance(t, float) or not hasattr(t, "__index__"):
                raise TypeError(f"{what}[{i}] must be an int, not {type(t).__name__}") from None
            if not _INT32[0] <= t.__index__() <= _INT32[1]:
                raise _ext.load().InvalidError(
                    f"{what}[{i}] = {t.__index__()} is outside the int32 range of token ids") from None
        raise exc


def span_array(spans, what: str = "spans") -> array.array:
    """(start, end) pairs as one ``array('q')`` of 2*n int64.

    Takes pairs, or a flat integer buffer of start, end, start, end..."""
    if isinstance(spans, array.array) and spans.typecode == "q":
        flat = spans
    else:
        flat = _buffer_ints(spans, what)
        if flat is None:
            pairs = list(spans)
            for i, pair in enumerate(pairs):
                if not isinstance(pair, (tuple, list)):
                    raise TypeError(f"{what}[{i}] must be a (start, end) pair, not {type(pair).__name__}")
                if len(pair) != 2:
                    raise ValueError(f"{what}[{i}] must have 2 items (start, end), has {len(pair)}")
            flat = array.array("q", itertools.chain.from_iterable(pairs))
    if len(flat) % 2:
        raise _ext.load().InvalidError(f"{what} must hold (start, end) pairs: an even number of "
                                       f"int64, not {len(flat)}")
    return flat


def _buffer_ints(obj, what: str) -> array.array | None:
    """A 1-D integer buffer as ``array('q')``; None when `obj` is no buffer."""
    try:
        view = memoryview(obj)
    except TypeError:
        return None
    fmt = view.format.lstrip("@=<")
    if view.ndim != 1 or len(fmt) != 1 or fmt not in "bBhHiIlLqQnN":
        raise TypeError(f"{what}: buffer of format '{view.format}' with {view.ndim} dimensions "
                        "is not a 1-D integer array")
    return array.array("q", view.tolist())


def float32_array(values, what: str = "values") -> array.array:
    """Floats (a sequence or a tensor) as one ``array('f')``."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return array.array("f", values)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of floats") from None


def _addr(buf: array.array) -> int:
    """Address of an array's first element (the array must stay alive)."""
    return buf.buffer_info()[0]


# --- stateless library calls ----------------------------------------------------

def version() -> str:
    """The C library's version string."""
    return lib().kvb_version().decode()


def has_cuda() -> bool:
    """True when libkvblend was built with its CUDA kernels."""
    return bool(lib().kvb_has_cuda())


def set_num_threads(n: int) -> None:
    """Threads the CPU ops may use (0 = all cores)."""
    if not _INT32[0] <= n <= _INT32[1]:
        raise _ext.load().InvalidError(f"num_threads={n}: expected 0 (all cores) to a few hundred")
    lib().kvb_cpu_set_threads(n)


def tier_key(fingerprint: int, rank: int, world: int) -> int:
    """The key of a model shard in the disk and remote tiers."""
    return lib().kvb_tier_key(fingerprint, rank, world)


def hash_tokens(tokens, namespace: int = 0) -> int:
    """The key of a segment: XXH3-64 of its ids as int32, seeded with the namespace."""
    t = int32_tokens(tokens)
    return lib().kvb_hash_tokens_ns(_addr(t), len(t), namespace)


def namespace(name: str | bytes) -> int:
    """The tenant namespace of a name (str as UTF-8, or bytes); '' is 0."""
    if not isinstance(name, (str, bytes)):
        raise TypeError(f"namespace name must be str or bytes, not {type(name).__name__}")
    raw = name.encode() if isinstance(name, str) else name
    return lib().kvb_namespace(raw, len(raw))


def segment_split(tokens, sep) -> list[tuple[int, int]]:
    """The segments between separator occurrences, as [(start, end)]."""
    t, s = int32_tokens(tokens), int32_tokens(sep, "sep")
    cap = len(t) // 2 + 1  # with a separator of >= 1 token, at most ceil(n / 2) segments
    out, count = array.array("q", bytes(16 * cap)), c_int64()
    lib().kvb_segment_split(_addr(t), len(t), _addr(s), len(s), _addr(out), cap, ctypes.byref(count))
    return [(out[2 * i], out[2 * i + 1]) for i in range(count.value)]


def segment_check(spans, n: int) -> None:
    """Raise InvalidError unless `spans` are sorted, disjoint ranges within [0, n)."""
    a = span_array(spans)
    lib().kvb_segment_check(_addr(a), len(a) // 2, n)


def gather(layout: Layout, slots: int, n: int, k_out: int, v_out: int, stream: int = 0) -> None:
    """kvb_{cpu,cuda}_gather on the layout's device (pointers as ints)."""
    args = (ctypes.byref(layout), slots, n, k_out, v_out)
    _op("gather", layout.device)(*args, *(() if layout.device < 0 else (stream,)))


def scatter(layout: Layout, slots: int, n: int, k_in: int, v_in: int, stream: int = 0) -> None:
    """kvb_{cpu,cuda}_scatter on the layout's device; a 0 input writes only the other."""
    args = (ctypes.byref(layout), slots, n, k_in or None, v_in or None)
    _op("scatter", layout.device)(*args, *(() if layout.device < 0 else (stream,)))


def rerotate(device: int, k: int, n: int, heads: int, head_size: int, dtype: int, rope: Rope,
             old_pos: int, new_pos: int, stream: int = 0) -> None:
    """kvb_{cpu,cuda}_rerotate (rope.inv_freq is host float32 in both cases)."""
    args = (k, n, heads, head_size, dtype, ctypes.byref(rope), old_pos, new_pos)
    _op("rerotate", device)(*args, *(() if device < 0 else (stream,)))


def deviation(device: int, a: int, b: int, n: int, heads: int, head_size: int, dtype: int,
              out: int, stream: int = 0) -> None:
    """kvb_{cpu,cuda}_deviation into float32 out [n]."""
    args = (a, b, n, heads, head_size, dtype, out)
    _op("deviation", device)(*args, *(() if device < 0 else (stream,)))


def select(device: int, score: int, forced: int, n: int, k: int, out: int, stream: int = 0,
           n_forced: int = 0) -> int:
    """kvb_{cpu,cuda}_select; returns the number of indices written."""
    count = c_int64()
    if device < 0:
        lib().kvb_cpu_select(score, forced or None, n, k, out, ctypes.byref(count))
    else:
        lib().kvb_cuda_select(score, forced or None, n, n_forced, k, out, stream, ctypes.byref(count))
    return count.value


def attention(q: int, q_pos: int, nq: int, k: int, v: int, k_pos: int, nk: int,
              num_q_heads: int, num_kv_heads: int, head_size: int, scale: float, dtype: int,
              out: int) -> None:
    """kvb_cpu_attention (host pointers): the exact causal mask by position."""
    lib().kvb_cpu_attention(q, q_pos, nq, k, v, k_pos, nk, num_q_heads, num_kv_heads, head_size,
                            scale, dtype, out)


def set_log_level(level: str | int) -> None:
    """Minimum level of C log lines forwarded to ``logging.getLogger("kvblend")``:
    "debug", "info", "warning", "error" or 0..3."""
    names = ("debug", "info", "warning", "error")
    ext = _ext.load()
    if isinstance(level, str) and level in names:
        level = names.index(level)
    elif isinstance(level, (str, bool)):
        raise ext.InvalidError(f"log level {level!r} is not one of 'debug', 'info', 'warning', "
                               "'error' (or 0..3)")
    ext.set_log_level(level)


# --- configuration ---------------------------------------------------------------

def _config_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(_ext.load().SIZEOF_CONFIG)


def parse_config(items=None) -> ctypes.Array:
    """A validated ``kvb_config`` (its bytes) from ``name -> value`` items.

    ``items`` is None, a mapping or pairs of LMCACHE_*/KVBLEND_* names to
    values (str, or int, float and bool written with ``str()``): defaults,
    ``kvb_config_set`` per item, then ``kvb_config_validate``.  A bad value
    raises InvalidError naming the variable; a name or value that C cannot
    hold (not text, a NUL character, not UTF-8) is refused by name."""
    ext, cfg = _ext.load(), _config_buffer()
    lib().kvb_config_init(cfg)
    for key, value in dict(items or {}).items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float)):
            raise TypeError("configuration names must be str and values str, int, float or "
                            f"bool, not {key!r}={value!r}")
        value = str(value)
        try:
            raw_key = key.encode()
        except UnicodeEncodeError:
            raw_key = b"\0"
        if b"\0" in raw_key:
            raise ext.InvalidError(f"configuration name {key!r} is not a name (NUL character or "
                                   "not UTF-8)")
        try:  # os.environ's non-UTF-8 bytes arrive as lone surrogates
            raw = value.encode()
        except UnicodeEncodeError:
            raise ext.InvalidError(f"{key}: the value is not valid UTF-8") from None
        if b"\0" in raw:
            raise ext.InvalidError(f"{key}={value!r}: the value contains a NUL character")
        lib().kvb_config_set(cfg, raw_key, raw)
    lib().kvb_config_validate(cfg)
    return cfg


def config_from_env() -> ctypes.Array:
    """``kvb_config_from_env`` over the process environment (validated)."""
    cfg = _config_buffer()
    lib().kvb_config_from_env(cfg)
    return cfg


def _short_float(f: float) -> float:
    """The shortest decimal that rounds to the float32 ``f`` (0.15, not 0.15000000596)."""
    for prec in range(6, 10):
        g = float(f"{f:.{prec}g}")
        if ctypes.c_float(g).value == f:
            return g
    return f


def _setting_value(row: Setting):
    """The Python value of a ``kvb_setting`` by its type (kvb_setting_type)."""
    if row.type == 0:
        return bool(row.i)
    if row.type == 1:
        return row.i
    if row.type == 2:
        return row.f
    if row.type == 3:
        return None if row.s is None else ctypes.string_at(row.s, row.n).decode()
    if row.type == 4:
        return [row.ints[j] for j in range(row.n)]
    return [_short_float(row.floats[j]) for j in range(row.n)] or None  # unset: None


def config_dict(cfg: ctypes.Array) -> dict:
    """One key per ``kvb_config`` field, walking the settings table
    (``kvb_config_get``); settings only checked here (no field) are left out."""
    out, row, i = {}, Setting(), 0
    while lib().kvb_config_get(cfg, i, ctypes.byref(row)) == 0:
        if row.key is not None:
            out[row.key.decode()] = _setting_value(row)
        i += 1
    return out


# --- the lower tiers' lookup-only view (a vLLM scheduler) -------------------------

class TiersView:
    """A lookup-only view of the disk and remote tiers a config names
    (``kvb_tiers_open_view``): :meth:`open` returns None when it names none."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    @classmethod
    def open(cls, items=None) -> "TiersView | None":
        out = c_void_p()
        lib().kvb_tiers_open_view(parse_config(items), ctypes.byref(out))
        return cls(out.value) if out.value else None

    def contains(self, key: int, h: int) -> bool:
        """Whether the disk or remote tier holds entry (tier key, segment hash)."""
        found = c_int()
        lib().kvb_tiers_contains(self._live(), key, h, ctypes.byref(found))
        return bool(found.value)

    def stats(self) -> dict:
        """``{"disk": {...}, "remote": {...}}``: each tier's counters."""
        return tier_stats(self._live())

    def close(self) -> None:
        """Close the view (idempotent; also on garbage collection)."""
        handle, self._handle = self._handle, None
        if handle:
            lib().kvb_tiers_free(handle)

    __del__ = close

    def _live(self) -> int:
        if not self._handle:
            raise _ext.load().InvalidError("the tiers view is closed")
        return self._handle


def tier_stats(tiers: int | None) -> dict | None:
    """The counters of the tiers at address ``tiers`` (None for none)."""
    if not tiers:
        return None
    disk, remote = TierStats(), TierStats()
    lib().kvb_tiers_get_stats(tiers, ctypes.byref(disk), ctypes.byref(remote))
    return {"disk": disk.as_dict(), "remote": remote.as_dict()}
