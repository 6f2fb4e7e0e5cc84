"""The C extension kvblend._kvblend and the torch wrappers of kvblend.ops,
checked against plain torch references."""

import array
import ctypes
import logging
import math

import numpy as np
import pytest
import torch

kvblend = pytest.importorskip("kvblend")
from kvblend import _ext  # noqa: E402

try:
    ext = _ext.load()
except ImportError as exc:  # the C extension is not built
    pytest.skip(str(exc), allow_module_level=True)

from kvblend import _clib as clib  # noqa: E402
from kvblend import layouts, ops  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


# --- references ----------------------------------------------------------------------

def ctypes_size(obj):
    return ctypes.sizeof(obj)


def rope_ref(x, pos, inv_freq, rotary_dim, style):
    """Rotate x [n, H, D] (float64) by pos[i] * inv_freq; dims >= rotary_dim pass."""
    x = x.double().clone()
    ang = pos.double()[:, None] * inv_freq.double()[None, :]  # [n, r/2]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    half = rotary_dim // 2
    if style == "neox":
        x1, x2 = x[..., :half].clone(), x[..., half:rotary_dim].clone()
        x[..., :half] = x1 * cos - x2 * sin
        x[..., half:rotary_dim] = x2 * cos + x1 * sin
    else:
        x1, x2 = x[..., 0:rotary_dim:2].clone(), x[..., 1:rotary_dim:2].clone()
        x[..., 0:rotary_dim:2] = x1 * cos - x2 * sin
        x[..., 1:rotary_dim:2] = x2 * cos + x1 * sin
    return x


def inv_freq_for(rotary_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def select_ref(score, forced, k):
    """Forced indices plus the k best others by (-score, index), NaN lowest."""
    n = len(score)
    forced = [False] * n if forced is None else [bool(f) for f in forced]
    others = [i for i in range(n) if not forced[i]]
    key = lambda i: (math.inf if math.isnan(score[i]) else -score[i], i)  # noqa: E731
    chosen = sorted(others, key=key)[:min(k, len(others))]
    return sorted(chosen + [i for i in range(n) if forced[i]])


def kv_row_ref(kv, layout, slot, block_size, which):
    """Row (H, D) of K (which=0) or V (which=1) at `slot` of a cache."""
    b, t = divmod(slot, block_size)
    if layout == "cpu_attn":  # per (block, head): K^T [D, N], then V [N, D]
        heads, d = kv.shape[1], kv.shape[3] // 2
        planes = kv[b].reshape(heads, 2, d * block_size)
        if which == 0:
            return planes[:, 0].view(heads, d, block_size)[:, :, t]
        return planes[:, 1].view(heads, block_size, d)[:, t]
    if layout == "cpu":
        return kv[which, b, :, t, :]
    if layout == "flash":
        return kv[which, b, t]
    if layout == "flashinfer":
        return kv[b, which, t]
    d = kv.shape[-1] // 2
    if layout == "bhnc":
        return kv[b, :, t, which * d:(which + 1) * d]
    return kv[b, t, :, which * d:(which + 1) * d]


def make_cache(layout, blocks, block_size, heads, dim, dtype, padded=False):
    shapes = {"cpu": (2, blocks, heads, block_size, dim), "flash": (2, blocks, block_size, heads, dim),
              "flashinfer": (blocks, 2, block_size, heads, dim), "joint": (blocks, block_size, heads, 2 * dim),
              "cpu_attn": (blocks, heads, block_size, 2 * dim), "bhnc": (blocks, heads, block_size, 2 * dim)}
    shape = list(shapes[layout])
    if not padded:
        return torch.randn(shape).to(dtype)
    # Every other block of a larger allocation: strides no longer describe a contiguous tensor.
    bdim = 1 if layout in ("cpu", "flash") else 0
    shape[bdim] *= 2
    big = torch.randn(shape).to(dtype)
    return big[:, ::2] if bdim == 1 else big[::2]


# --- extension surface -------------------------------------------------------------

def test_ext_exception_hierarchy():
    pairs = {"InvalidError": ValueError, "NoMemoryError": MemoryError, "UnsupportedError": NotImplementedError,
             "CudaError": RuntimeError, "NotFoundError": LookupError, "InternalError": RuntimeError}
    assert issubclass(ext.Error, Exception)
    for name, base in pairs.items():
        cls = getattr(ext, name)
        assert issubclass(cls, ext.Error) and issubclass(cls, base), name
        assert getattr(kvblend, name) is cls
        assert cls.__module__ == "kvblend"
    assert kvblend.Error is ext.Error


def test_ext_constants_and_version():
    assert (ext.DTYPE_F32, ext.DTYPE_F16, ext.DTYPE_BF16) == (0, 1, 2)
    assert (ext.ROPE_NEOX, ext.ROPE_GPTJ) == (0, 1)
    assert (ext.DEVIATION_K, ext.DEVIATION_V, ext.DEVIATION_KV) == (0, 1, 2)
    assert (ext.TIER_HOST, ext.TIER_DEVICE) == (0, 1)
    assert clib.version() == kvblend.__version__
    assert isinstance(clib.has_cuda(), bool)


def test_ext_hash_is_the_same_for_every_token_container():
    toks = [5, 17, 2**31 - 1, -3, 0]
    h = clib.hash_tokens(toks)
    assert 0 <= h < 2**64
    assert clib.hash_tokens(tuple(toks)) == h
    assert clib.hash_tokens(array.array("i", toks)) == h
    assert clib.hash_tokens(array.array("q", toks)) == h
    assert clib.hash_tokens(np.array(toks, dtype=np.int32)) == h
    assert clib.hash_tokens(np.array(toks, dtype=np.int64)) == h
    assert clib.hash_tokens(np.array(toks + toks, dtype=np.int64)[::2]) == clib.hash_tokens((toks + toks)[::2])
    assert clib.hash_tokens(torch.tensor(toks)) == h
    assert clib.hash_tokens(toks[:-1]) != h
    assert clib.hash_tokens([5, 17]) != clib.hash_tokens([17, 5])
    assert clib.hash_tokens([]) == clib.hash_tokens(array.array("i"))


@pytest.mark.parametrize("bad,exc,fragment", [
    ([2**31], ValueError, "tokens[0] = 2147483648 is outside the int32 range"),
    ([1, -2**31 - 1], ValueError, "tokens[1] = -2147483649 is outside the int32 range"),
    (np.array([1, 2**40], dtype=np.int64), ValueError, "tokens[1] = 1099511627776"),
    (np.array([2**32 - 1], dtype=np.uint32), ValueError, "tokens[0] = 4294967295"),
    (torch.tensor([1, 2**40]), ValueError, "tokens[1] = 1099511627776"),
    ([1, 2.5], TypeError, "tokens[1] must be an int, not float"),
    ("abc", TypeError, "not str"),
    (np.zeros((2, 2), dtype=np.int32), TypeError, "not a 1-D integer array"),
    (np.zeros(3, dtype=np.float32), TypeError, "not a 1-D integer array"),
    (5, TypeError, "sequence"),
])
def test_ext_bad_tokens_are_refused(bad, exc, fragment):
    with pytest.raises(exc) as info:
        clib.hash_tokens(bad)
    assert fragment in str(info.value)
    if exc is ValueError:
        assert isinstance(info.value, ext.InvalidError)


def test_ext_segment_split_round_trip():
    sep = [7, 8]
    chunks = [[1, 2, 3], [4], [5, 6, 9, 10]]
    toks = chunks[0] + sep + chunks[1] + sep + chunks[2]
    spans = clib.segment_split(toks, sep)
    assert [toks[a:b] for a, b in spans] == chunks
    clib.segment_check(spans, len(toks))
    # Separators at the ends and back to back give no empty segments.
    assert clib.segment_split(sep + [1] + sep + sep + [2] + sep, sep) == [(2, 3), (7, 8)]
    assert clib.segment_split([1, 2, 3], [9]) == [(0, 3)]
    assert clib.segment_split(np.array([1, 9, 2], dtype=np.int64), array.array("i", [9])) == [(0, 1), (2, 3)]


def test_ext_segment_bad_input():
    with pytest.raises(ext.InvalidError):
        clib.segment_split([1, 2], [])
    with pytest.raises(ext.InvalidError, match="longer than the prompt"):
        clib.segment_split([1], [1, 2])
    with pytest.raises(ext.InvalidError):
        clib.segment_check([(0, 3), (2, 4)], 10)  # overlap
    with pytest.raises(ext.InvalidError):
        clib.segment_check([(0, 11)], 10)  # past the end
    with pytest.raises(ext.InvalidError):
        clib.segment_check([(3, 3)], 10)  # empty
    with pytest.raises(TypeError, match=r"spans\[0\] must be a \(start, end\) pair"):
        clib.segment_check([5], 10)
    with pytest.raises(ValueError, match=r"spans\[0\] must have 2 items"):
        clib.segment_check([(1, 2, 3)], 10)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'sep'"):
        clib.segment_split([1])


def test_clib_argument_errors_name_the_field_and_value():
    L = clib.Layout
    lay = L(k_ptr=1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
            block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1)
    assert (lay.k_ptr, lay.dim_stride, lay.device, lay.v_dim_stride) == (1, 1, -1, 0)
    assert ctypes_size(lay) == 112  # sizeof(kvb_paged_layout) on LP64; save_layer checks it in C
    with pytest.raises(TypeError, match=r"gather\(\) missing 3 required positional arguments"):
        clib.gather(lay, 0)
    with pytest.raises(ctypes.ArgumentError, match="argument 3"):
        clib.gather(lay, 0, 1.0, 0, 0)
    with pytest.raises(ctypes.ArgumentError, match="-5 is not a valid address"):
        clib.gather(lay, 0, 1, -5, 0)
    with pytest.raises(ctypes.ArgumentError, match="an address must be an int, not str"):
        clib.gather(lay, 0, 1, "0", 0)
    with pytest.raises(TypeError):
        clib.gather((1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, -1), 0, 1, 0, 0)
    with pytest.raises(TypeError, match="Layout field 'token_stride' must be an int, not str"):
        L(k_ptr=1, v_ptr=1, block_stride=0, token_stride="x", head_stride=0, dim_stride=1, num_blocks=1,
          block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1)
    with pytest.raises(TypeError, match="Layout\\(\\) misses field 'device'"):
        L(k_ptr=1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
          block_size=1, num_kv_heads=1, head_size=1, dtype=0)
    with pytest.raises(TypeError, match="unknown field"):
        L(k_ptr=1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
          block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1, v_dim_strde=0)
    with pytest.raises(ValueError, match="Layout field 'num_kv_heads' = 4294967296 does not fit int32"):
        L(k_ptr=1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
          block_size=1, num_kv_heads=2**32, head_size=1, dtype=0, device=-1)
    with pytest.raises(ValueError, match="-1 is not a valid address"):
        L(k_ptr=-1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
          block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1)
    bad_v = L(k_ptr=1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
              block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1, v_block_stride=1,
              v_token_stride=1, v_head_stride=1, v_dim_stride=-1)
    with pytest.raises(ext.InvalidError, match=r"layout->v_dim_stride=-1 is invalid"):
        clib.gather(bad_v, 0, 1, 0, 0)
    null = L(k_ptr=0, v_ptr=0, block_stride=0, token_stride=0, head_stride=0, dim_stride=1, num_blocks=1,
             block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1)
    with pytest.raises(ext.InvalidError):  # NULL bases reach C and are refused there
        clib.gather(null, 0, 0, 0, 0)
    with pytest.raises(ext.InvalidError, match="num_threads=-1"):
        clib.set_num_threads(-1)
    with pytest.raises(ext.InvalidError, match="num_threads=1099511627776"):
        clib.set_num_threads(2**40)


def test_ext_takes_flat_buffers_and_converts_the_rest():
    cfg = {"LMCACHE_ENABLE_BLENDING": "True"}
    inv = [float(x) for x in inv_freq_for(D)]
    for freqs in (inv, array.array("f", inv), np.array(inv, dtype=np.float32), torch.tensor(inv)):
        kvblend.Connector(cfg, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX, freqs)
    with pytest.raises(TypeError, match="inv_freq must be a sequence of floats"):
        kvblend.Connector(cfg, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX, ["x"] * (D // 2))
    conn = kvblend.Connector(cfg, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX, inv)
    toks = list(range(10))
    want = conn.lookup(toks, spans=[(0, 5), (5, 10)])
    assert conn.lookup(array.array("i", toks), spans=array.array("q", [0, 5, 5, 10])) == want
    assert conn.lookup(np.array(toks, dtype=np.int64), spans=np.array([0, 5, 5, 10])) == want
    with pytest.raises(ValueError, match="even number of int64"):
        conn.lookup(toks, spans=array.array("q", [0, 5, 5]))
    with pytest.raises(ValueError, match=r"spans\[1\] must have 2 items"):
        conn.lookup(toks, spans=[(0, 5), (5,)])
    lay = clib.Layout(k_ptr=1, v_ptr=1, block_stride=0, token_stride=0, head_stride=0, dim_stride=1,
                      num_blocks=1, block_size=1, num_kv_heads=1, head_size=1, dtype=0, device=-1)
    with conn.begin(toks) as req:
        with pytest.raises(ext.InvalidError, match="layout has 3 bytes"):
            req.save_layer(0, b"abc", 0, 0)
        with pytest.raises(TypeError):
            req.save_layer(0, (1, 2), 0, 0)
        with pytest.raises(ValueError, match="-1 is not a valid address"):
            req.load_layer(0, -1, 0)
        with pytest.raises(TypeError, match="'x' is not a valid address"):
            req.save_layer(0, bytes(lay), "x", 0)
        assert memoryview(lay).nbytes == ctypes_size(lay)


def test_ext_log_level_names():
    clib.set_log_level("warning")
    clib.set_log_level(ext.LOG_ERROR)
    with pytest.raises(ext.InvalidError, match="'debug', 'info', 'warning', 'error'"):
        clib.set_log_level("loud")
    with pytest.raises(ext.InvalidError, match="LOG_DEBUG..LOG_ERROR"):
        ext.set_log_level(7)
    with pytest.raises(ext.InvalidError, match="LOG_DEBUG..LOG_ERROR"):
        ext.set_log_level("warning")  # the extension takes the number; _clib the name
    clib.set_log_level("warning")


def test_clib_structures_have_the_c_sizes():
    """Each ctypes mirror of a public C struct has the size the extension
    was compiled with (lib() refuses to load otherwise)."""
    import ctypes as ct

    for const, struct in clib._SIZES.items():
        assert ct.sizeof(struct) == getattr(ext, const), struct.__name__
    assert ext.SIZEOF_CONFIG > 1000  # the paths are inline arrays
    cfg = clib.parse_config({"LMCACHE_CHUNK_SIZE": "128"})
    assert len(bytes(cfg)) == ext.SIZEOF_CONFIG
    assert clib.config_dict(cfg)["chunk_size"] == 128
    with pytest.raises(ext.InvalidError, match="config has 3 bytes"):
        ext.Connector(b"abc", LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX,
                      array.array("f", inv_freq_for(D).tolist()))
    with pytest.raises(TypeError, match="tokens must be a flat int32 buffer, not list"):
        kvblend.Connector({}, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX,
                          inv_freq_for(D))._c.begin([1, 2, 3])


def test_import_has_no_side_effects():
    import subprocess
    import sys
    code = ("import sys, kvblend; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "assert 'kvblend._kvblend' not in sys.modules, 'ext'; "
            "print(kvblend.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kvblend.__version__


# --- ops: paged layouts -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layout", layouts.NAMES)
def test_ops_gather_scatter_every_layout(layout, padded, dtype):
    torch.manual_seed(0)
    blocks, bs, heads, dim = 3, 4, 2, 8
    kv = make_cache(layout, blocks, bs, heads, dim, dtype, padded)
    lay = ops.paged_layout(kv, layout)
    assert (lay.num_blocks, lay.block_size, lay.num_kv_heads, lay.head_size) == (blocks, bs, heads, dim)
    slots = torch.tensor([5, -1, 0, 11, 7], dtype=torch.int64)
    n = len(slots)
    # gather equals direct indexing; padding rows stay untouched
    k_out = torch.full((n, heads, dim), 42.0).to(dtype)
    v_out = torch.full((n, heads, dim), 42.0).to(dtype)
    ops.gather(lay, slots, k_out, v_out)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            assert (k_out[i] == 42).all() and (v_out[i] == 42).all()
        else:
            assert torch.equal(k_out[i], kv_row_ref(kv, layout, s, bs, 0))
            assert torch.equal(v_out[i], kv_row_ref(kv, layout, s, bs, 1))
    # scatter then gather is the identity on valid slots; other slots unchanged
    before = kv.clone()
    k_in, v_in = torch.randn(n, heads, dim).to(dtype), torch.randn(n, heads, dim).to(dtype)
    ops.scatter(lay, slots, k_in, v_in)
    ops.gather(lay, slots, k_out, v_out)
    valid = slots >= 0
    assert torch.equal(k_out[valid], k_in[valid]) and torch.equal(v_out[valid], v_in[valid])
    for s in range(blocks * bs):
        if s not in slots.tolist():
            assert torch.equal(kv_row_ref(kv, layout, s, bs, 0), kv_row_ref(before, layout, s, bs, 0))
    # scatter of V only leaves K alone
    k_now = kv_row_ref(kv, layout, 5, bs, 0).clone()
    ops.scatter(lay, slots[:1], None, torch.zeros(1, heads, dim).to(dtype))
    assert torch.equal(kv_row_ref(kv, layout, 5, bs, 0), k_now)
    assert (kv_row_ref(kv, layout, 5, bs, 1) == 0).all()


def test_ops_cpu_attn_layout_transposed_k():
    """'cpu_attn' (vLLM's CPU_ATTN): K rows land transposed per block and
    head, V rows row-major, and the layout carries V's own strides."""
    blocks, bs, heads, dim = 2, 4, 2, 3
    kv = torch.zeros(blocks, heads, bs, 2 * dim)
    lay = ops.paged_layout(kv, "cpu_attn")
    assert (lay.block_stride, lay.token_stride, lay.head_stride, lay.dim_stride) == (heads * bs * 2 * dim, 1, bs * 2 * dim, bs)
    assert (lay.v_block_stride, lay.v_token_stride, lay.v_head_stride, lay.v_dim_stride) == (heads * bs * 2 * dim, dim, bs * 2 * dim, 1)
    assert lay.v_ptr - lay.k_ptr == bs * dim * 4
    k = torch.arange(1, heads * dim + 1, dtype=torch.float32).view(1, heads, dim)
    ops.scatter(lay, torch.tensor([bs + 2]), k, -k)
    flat = kv.view(blocks, heads, 2 * bs * dim)
    for h in range(heads):
        for d in range(dim):
            assert flat[1, h, d * bs + 2] == k[0, h, d]
            assert flat[1, h, bs * dim + 2 * dim + d] == -k[0, h, d]
    assert int((kv != 0).sum()) == 2 * heads * dim
    # equal strides for K and V: V strides 0 (K's)
    eq = ops.paged_layout(torch.zeros(2, blocks, bs, heads, dim), "flash")
    assert (eq.v_block_stride, eq.v_token_stride, eq.v_head_stride, eq.v_dim_stride) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"layout 'cpu_attn' needs each \(block, head\) contiguous"):
        ops.paged_layout(torch.zeros(blocks, bs, heads, 2 * dim).transpose(1, 2), "cpu_attn")
    with pytest.raises(ValueError, match=r"layout 'cpu_attn' expects shape \(num_blocks, num_kv_heads"):
        ops.paged_layout(torch.zeros(blocks, heads, bs, 5), "cpu_attn")


def test_ops_layout_bad_input():
    kv = torch.zeros(2, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="layout: expected one of"):
        ops.paged_layout(kv, "paged")
    with pytest.raises(ValueError, match=r"layout 'flashinfer' expects shape \(num_blocks, 2, .*got \(2, 3, 4, 2, 8\)"):
        ops.paged_layout(kv, "flashinfer")
    with pytest.raises(ValueError, match="kv_cache: expected dtype torch.float32 or torch.float16 or torch.bfloat16, got torch.int32"):
        ops.paged_layout(kv.int(), "flash")
    with pytest.raises(ValueError, match="layout 'joint' expects"):
        ops.paged_layout(torch.zeros(3, 4, 2, 7), "joint")
    lay = ops.paged_layout(kv, "flash")
    slots = torch.arange(5)
    with pytest.raises(ValueError, match=r"k_out: expected shape \(5, 2, 8\), got \(5, 2, 4\)"):
        ops.gather(lay, slots, torch.zeros(5, 2, 4), torch.zeros(5, 2, 8))
    with pytest.raises(ValueError, match="v_out: expected dtype torch.float32, got torch.bfloat16"):
        ops.gather(lay, slots, torch.zeros(5, 2, 8), torch.zeros(5, 2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="slots: expected dtype torch.int64, got torch.int32"):
        ops.gather(lay, slots.int(), torch.zeros(5, 2, 8), torch.zeros(5, 2, 8))
    with pytest.raises(ValueError, match="k_out: expected a contiguous tensor"):
        ops.gather(lay, slots, torch.zeros(8, 2, 5).transpose(0, 2), torch.zeros(5, 2, 8))
    with pytest.raises(TypeError, match="k_in must be a torch.Tensor, not list"):
        ops.scatter(lay, slots, [0], None)
    with pytest.raises(ValueError, match="both None"):
        ops.scatter(lay, slots, None, None)
    with pytest.raises(ext.InvalidError, match="24"):  # slot past num_blocks*block_size, found by C
        ops.gather(lay, torch.tensor([24]), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))


# --- ops: re-rotation --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_ops_rerotate_equals_rope_at_new_position(rotary_dim, style, dtype):
    torch.manual_seed(1)
    n, heads, dim = 7, 3, 16
    inv = inv_freq_for(rotary_dim)
    x = torch.randn(n, heads, dim, dtype=torch.float64)
    old = torch.randint(0, 2000, (n,))
    new = torch.randint(0, 2000, (n,))
    k = rope_ref(x, old, inv, rotary_dim, style).to(dtype)
    stored = k.clone()
    out = ops.rerotate(k, inv, rotary_dim, style, old, new)
    assert out is k
    if dtype == torch.float32:
        torch.testing.assert_close(k.double(), rope_ref(x, new, inv, rotary_dim, style), atol=2e-5, rtol=1e-5)
    else:  # the stored bf16 keys rotated by the delta, rounded once to bf16
        ref = rope_ref(stored.double(), new - old, inv, rotary_dim, style)
        torch.testing.assert_close(k.double(), ref, atol=2e-2, rtol=1e-2)
    # partial rotary: the tail passes through bit for bit
    assert torch.equal(k[..., rotary_dim:], stored[..., rotary_dim:])


def test_ops_rerotate_attention_factor_and_errors():
    n, heads, dim = 2, 1, 8
    inv = inv_freq_for(8)
    k = torch.randn(n, heads, dim)
    same = torch.zeros(n, dtype=torch.int64)
    k2 = k.clone()
    ops.rerotate(k2, inv, 8, "neox", same, same, attention_factor=1.0)
    torch.testing.assert_close(k2, k)  # a zero delta is the identity
    with pytest.raises(ValueError, match=r"inv_freq: expected shape \(4,\) for rotary_dim 8, got \(3,\)"):
        ops.rerotate(k, inv[:3], 8, "neox", same, same)
    with pytest.raises(ValueError, match="style: expected 'neox' or 'gptj'"):
        ops.rerotate(k, inv, 8, "yarn", same, same)
    with pytest.raises(ValueError, match=r"new_pos: expected shape \(2,\), got \(3,\)"):
        ops.rerotate(k, inv, 8, "neox", same, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ext.InvalidError, match="rotary_dim"):  # odd rotary_dim, refused by C
        ops.rerotate(k, inv[:1], 3, "neox", same, same)


# --- ops: deviation, select ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_deviation_matches_reference(dtype):
    torch.manual_seed(2)
    a = torch.randn(9, 2, 16).to(dtype)
    b = torch.randn(9, 2, 16).to(dtype)
    out = ops.deviation(a, b)
    assert out.dtype == torch.float32 and out.shape == (9,)
    ref = ((a.double() - b.double()) ** 2).sum((1, 2))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.deviation(a, a), torch.zeros(9))
    with pytest.raises(ValueError, match=r"b: expected shape \(9, 2, 16\), got \(9, 2, 8\)"):
        ops.deviation(a, b[..., :8].contiguous())


def test_ops_select_ties_nan_and_forced():
    score = torch.tensor([0.5, 0.9, 0.5, float("nan"), 0.9, 0.1, 0.5])
    forced = torch.tensor([0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert ops.select(score, forced, 3).tolist() == [0, 1, 2, 4]
    assert ops.select(score, forced.to(torch.uint8), 3).tolist() == [0, 1, 2, 4]
    assert ops.select(score, None, 0).tolist() == []
    assert ops.select(score, None, 100).tolist() == list(range(7))  # k clamped
    assert ops.select(score, forced, 5).tolist() == [0, 1, 2, 4, 5, 6]  # NaN last
    assert ops.select(score, None, 4).dtype == torch.int64


@pytest.mark.parametrize("seed", range(5))
def test_ops_select_matches_sorted_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = 64
    score = torch.randint(0, 5, (n,), generator=g).float()  # many ties
    score[torch.randint(0, n, (3,), generator=g)] = float("nan")
    forced = torch.rand(n, generator=g) < 0.2
    for k in (0, 1, 7, 30, n):
        got = ops.select(score, forced, k).tolist()
        assert got == select_ref(score.tolist(), forced.tolist(), k), k


def test_ops_select_bad_input():
    with pytest.raises(ValueError, match="score: expected dtype torch.float32, got torch.float64"):
        ops.select(torch.zeros(3, dtype=torch.float64), None, 1)
    with pytest.raises(ValueError, match=r"forced: expected shape \(3,\), got \(4,\)"):
        ops.select(torch.zeros(3), torch.zeros(4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="k: expected >= 0, got -1"):
        ops.select(torch.zeros(3), None, -1)


# --- ops: attention ------------------------------------------------------------------------

def attention_ref(q, q_pos, k, v, k_pos, scale):
    group = q.shape[1] // k.shape[1]
    kx = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, nk, D]
    vx = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    mask = k_pos[None, :] <= q_pos[:, None]  # [nq, nk], True = attend
    out = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(0, 1), kx, vx, attn_mask=mask,
                                                           scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_ops_attention_matches_sdpa_with_causal_mask_by_position(heads, dtype):
    torch.manual_seed(3)
    hq, hkv = heads
    nk, dim = 23, 16
    k_pos = torch.randperm(nk)  # keys in any order
    q_pos = torch.tensor([0, 5, 22, 11, 3])  # every query sees at least key 0
    q = torch.randn(len(q_pos), hq, dim).to(dtype)
    k = torch.randn(nk, hkv, dim).to(dtype)
    v = torch.randn(nk, hkv, dim).to(dtype)
    out = ops.attention(q, q_pos, k, v, k_pos)
    ref = attention_ref(q, q_pos, k, v, k_pos, dim ** -0.5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    # a custom scale and a caller-provided output buffer
    buf = torch.empty_like(q)
    assert ops.attention(q, q_pos, k, v, k_pos, scale=0.3, out=buf) is buf
    torch.testing.assert_close(buf.float(), attention_ref(q, q_pos, k, v, k_pos, 0.3), **tol)


def test_ops_attention_query_without_keys_gets_zeros_and_bad_input():
    q = torch.randn(2, 2, 8)
    k = torch.randn(3, 1, 8)
    v = torch.randn(3, 1, 8)
    out = ops.attention(q, torch.tensor([-1, 10]), k, v, torch.tensor([0, 1, 2]))
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1:], attention_ref(q[1:], torch.tensor([10]), k, v, torch.tensor([0, 1, 2]),
                                                      8 ** -0.5))
    with pytest.raises(ValueError, match="k: expected dtype torch.float32, got torch.float16"):
        ops.attention(q, torch.tensor([0, 1]), k.half(), v, torch.arange(3))
    with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_q_heads 2"):
        ops.attention(q, torch.tensor([0, 1]), torch.zeros(3, 3, 8), torch.zeros(3, 3, 8), torch.arange(3))
    with pytest.raises(ValueError, match=r"q_pos: expected shape \(2,\), got \(3,\)"):
        ops.attention(q, torch.arange(3), k, v, torch.arange(3))


# --- Connector and Request -------------------------------------------------------------

SEP = 99
A, B, Q = [1, 2, 3, 4, 5], [10, 11, 12, 13, 14], [20, 21]
HQ, HKV, D, LAYERS = 4, 2, 8, 2


def make_connector(**items):
    cfg = {"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.01", **items}
    conn = kvblend.Connector(cfg, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX,
                         inv_freq_for(D).tolist(), 1.0, -1)
    conn.set_separator([SEP])
    return conn


def save_prompt(conn, tokens, caches):
    """Run the save path of one prefill whose KV sits at slots 0..n-1."""
    slots = torch.arange(len(tokens))
    with conn.begin(tokens) as req:
        for layer, kv in enumerate(caches):
            req.save_layer(layer, ops.paged_layout(kv, "flash"), slots.data_ptr(), len(tokens))
    assert req.finished


def test_connector_save_then_reuse_reordered_chunks():
    torch.manual_seed(4)
    conn = make_connector()
    assert conn.device == -1
    p1 = A + [SEP] + B + [SEP] + Q
    segs, reuse_end = conn.lookup(p1)
    assert segs == [(0, 5, False), (6, 11, False), (12, 14, False)] and reuse_end == 0
    caches = [torch.randn(2, 4, 8, HKV, D) for _ in range(LAYERS)]  # flash: (2, blocks, block, H, D)
    save_prompt(conn, p1, caches)
    stats = conn.store_stats()
    assert stats["num_entries"] == 3 and stats["inserts"] == 3 and stats["host_bytes"] > 0

    p2 = B + [SEP] + A + [SEP] + [30, 31]
    segs, reuse_end = conn.lookup(p2)
    assert segs == [(0, 5, True), (6, 11, True), (12, 14, False)] and reuse_end == 11
    assert conn.lookup(p2) == (segs, reuse_end)  # no side effects
    req = conn.begin(p2, blend_end=reuse_end, save=False)
    assert req.blend_end == 11
    assert list(req.forced()) == [0] * 5 + [1] + [0] * 5
    assert req.counts() == (3, 2, 1)
    new_pos = torch.arange(11)
    old_pos = torch.tensor([6, 7, 8, 9, 10, -1, 0, 1, 2, 3, 4])  # where each row was stored
    for layer in range(LAYERS):
        stage_k = torch.full((11, HKV, D), 7.0)
        stage_v = torch.full((11, HKV, D), 7.0)
        req.load_layer(layer, stage_k.data_ptr(), stage_v.data_ptr())
        for row in range(11):
            if row == 5:  # the separator has no stored KV: untouched
                assert (stage_k[row] == 7).all() and (stage_v[row] == 7).all()
                continue
            src = int(old_pos[row])
            k_stored = caches[layer][0].reshape(-1, HKV, D)[src]
            v_stored = caches[layer][1].reshape(-1, HKV, D)[src]
            assert torch.equal(stage_v[row], v_stored)
            ref = rope_ref(k_stored[None], torch.tensor([int(new_pos[row]) - src]), inv_freq_for(D), D, "neox")[0]
            torch.testing.assert_close(stage_k[row].double(), ref, atol=2e-5, rtol=1e-5)
    req.finish(commit=False)
    assert req.finished
    req.finish()  # idempotent
    with pytest.raises(ext.InvalidError, match="the request is finished"):
        req.blend_end
    with pytest.raises(ext.InvalidError, match="the request is finished"):
        req.load_layer(0, 1, 1)
    conn.store_clear()
    assert conn.store_stats()["num_entries"] == 0
    assert conn.lookup(p2)[1] == 0


def test_connector_spans_and_uncommitted_requests():
    torch.manual_seed(5)
    conn = make_connector()
    toks = A + B
    spans = [(0, 5), (5, 10)]
    assert conn.lookup(toks, spans=spans) == ([(0, 5, False), (5, 10, False)], 0)
    caches = [torch.randn(2, 2, 8, HKV, D) for _ in range(LAYERS)]
    slots = torch.arange(len(toks))
    req = conn.begin(toks, spans=spans)
    for layer, kv in enumerate(caches):
        req.save_layer(layer, ops.paged_layout(kv, "flash"), slots.data_ptr(), len(toks))
    del req  # dropped without finish(): nothing is committed
    assert conn.store_stats()["num_entries"] == 0
    with pytest.raises(ValueError):
        with conn.begin(toks, spans=spans) as req:  # an exception inside the block aborts
            req.save_layer(0, ops.paged_layout(caches[0], "flash"), slots.data_ptr(), len(toks))
            raise ValueError("engine failed")
    assert conn.store_stats()["num_entries"] == 0
    with pytest.raises(ext.InvalidError):
        conn.lookup(toks, spans=[(0, 5), (4, 10)])  # overlapping spans


def test_connector_bad_arguments():
    inv = inv_freq_for(D).tolist()
    with pytest.raises(ext.InvalidError, match="LMCACHE_CHUNK_SIZE"):
        kvblend.Connector({"LMCACHE_CHUNK_SIZE": "-1"}, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX, inv)
    with pytest.raises(ext.InvalidError, match=r"inv_freq has 3 entries; rotary_dim = 8 needs rotary_dim/2 = 4"):
        kvblend.Connector({}, LAYERS, HQ, HKV, D, ext.DTYPE_F32, D, ext.ROPE_NEOX, inv[:3])
    with pytest.raises(ext.Error):
        kvblend.Connector({}, LAYERS, HQ, 3, D, ext.DTYPE_F32, D, ext.ROPE_NEOX, inv)  # 4 q heads over 3 kv heads
    with pytest.raises(TypeError):
        ext.Request()
    conn = make_connector()
    with pytest.raises(ext.InvalidError, match="int32 range"):
        conn.lookup([2**40])
    with pytest.raises(TypeError):
        conn.begin("text")


def test_c_log_lines_reach_the_kvblend_logger(caplog):
    conn = make_connector(LMCACHE_MAX_LOCAL_CPU_SIZE="0.000000001")  # ~1 byte: every chunk is too large
    with caplog.at_level(logging.INFO, logger="kvblend"):
        conn.begin(A + [SEP] + B).finish(commit=False)
    records = [r for r in caplog.records if r.name == "kvblend"]
    assert any("not storing a chunk of 5 tokens" in r.getMessage() and r.levelno == logging.WARNING
               for r in records), [r.getMessage() for r in records]
    assert conn.store_stats()["rejected"] >= 1


_LOG_RACE = r"""
import logging, threading, time
logging.getLogger("kvblend").addHandler(logging.NullHandler())
logging.getLogger("kvblend").propagate = False
import torch
import kvblend
from kvblend import _ext
ext = _ext.load()
inv = (1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))).tolist()
# a host budget of about a byte: every begin logs "not storing a chunk" from
# C with the GIL released, through the sink that takes the GIL again
conn = kvblend.Connector({"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1e-9"},
                     2, 4, 2, 8, ext.DTYPE_F32, 8, ext.ROPE_NEOX, inv, 1.0, -1)
conn.set_separator([99])
stop, begun = threading.Event(), [0]
def worker():
    while not stop.is_set():
        with conn.begin([1, 2, 3, 99, 4, 5, 6]):
            begun[0] += 1
t = threading.Thread(target=worker)
t.start()
end, changes = time.monotonic() + 1.5, 0
while time.monotonic() < end:
    ext.set_log_level(ext.LOG_WARNING)  # takes the log lock with the GIL held
    changes += 1
stop.set()
t.join()
print("ok", begun[0], changes)
"""


def test_c_logging_while_python_sets_the_level_never_hangs():
    """A thread inside C (GIL released) logs through the Python sink while
    the thread holding the GIL changes the log level: with the sink called
    under the log lock the two wait for each other forever.  Run in a child
    process so a regression fails by timeout instead of hanging the suite."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LOG_RACE], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    word, begun, changes = r.stdout.split()
    assert word == "ok" and int(begun) > 0 and int(changes) > 0
