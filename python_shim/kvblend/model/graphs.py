"""CUDA graphs: per-layer graphs of an adapter's dense pieces
(``LayerGraphs``) and the capture helper every graph of kvblend goes
through (``capture_cuda_graph``)."""

from __future__ import annotations

import logging

import torch


class LayerGraphs:
    """Per-layer CUDA graphs of a decoder layer's two dense pieces, the way
    vLLM's piecewise graphs run small batches: "qkv" (input norm,
    projections, q/k norms, RoPE with the tables given) and "out" (o_proj,
    residual, post-attention norm, MLP, residual).  Attention and the KV
    cache writes stay eager between them.

    A call with T rows runs the graph of the smallest bucket that holds T
    (powers of two up to 256, then multiples of 128 up to ``max_tokens``):
    inputs are copied into the graph's static buffers (rows past T keep
    earlier finite values; every row is computed independently, so they
    never touch the first T), the graph is replayed, and views of the first
    T rows of its static outputs are returned.  A graph is captured the
    first time its (piece, layer, bucket, dtypes) is used, on a side stream,
    with one shared memory pool; a capture that fails (logged once) leaves
    that piece eager.  The outputs stay valid until the same
    piece of the same layer runs again in the same bucket.

    Graphs of at most ``max_buckets`` buckets are kept: using another one
    drops the least recently used bucket's graphs (their static buffers
    return to the pool), which bounds the memory a server with many prompt
    lengths spends on them.
    """

    def __init__(self, adapter, max_tokens: int, max_buckets: int = 4):
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.max_buckets = max(1, max_buckets)
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_tokens]
        self.buckets += list(range(384, max_tokens, 128)) + [max_tokens]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}
        # static inputs shared by the layers of a piece and bucket, with the
        # tensor last copied into each (held, so a later tensor can never be
        # mistaken for it)
        self.inputs: dict = {}
        self.recent: list[int] = []  # buckets, least recently used first
        self.captures = 0
        self.failures = 0

    def fits(self, h: torch.Tensor) -> bool:
        """Whether rows of ``h`` [T, hidden] go through a graph."""
        return h.is_cuda and 0 < h.shape[0] <= self.max_tokens and not torch.is_grad_enabled()

    def bucket(self, T: int) -> int:
        """The bucket that runs T rows."""
        return next(b for b in self.buckets if b >= T)

    def run(self, piece: str, layer: int, inputs: tuple):
        """Replay (capturing first if needed) ``piece`` of ``layer`` on
        ``inputs`` (each [T, ...]); returns views of the outputs' first T rows."""
        T = inputs[0].shape[0]
        bucket = self.bucket(T)
        if not self.recent or self.recent[-1] != bucket:
            if bucket in self.recent:
                self.recent.remove(bucket)
            self.recent.append(bucket)
            while len(self.recent) > self.max_buckets:
                old = self.recent.pop(0)
                self.graphs = {k: v for k, v in self.graphs.items() if k[2] != old}
                self.inputs = {k: v for k, v in self.inputs.items() if k[1] != old}
        key = (piece, layer, bucket) + tuple((x.dtype, tuple(x.shape[1:])) for x in inputs)
        entry = self.graphs.get(key, False)
        if entry is False:
            entry = self.graphs[key] = self._capture(piece, layer, bucket, inputs)
        if entry is None:  # its capture failed: this piece runs eagerly
            a = self.adapter
            out = a._qkv(layer, *inputs) if piece == "qkv" else a._out(layer, *inputs)
            return out if isinstance(out, tuple) else (out,)
        graph, static_in, static_out, last = entry
        for i, (buf, x) in enumerate(zip(static_in, inputs)):
            # "qkv"'s cos/sin (inputs 1, 2) come from the adapter's RoPE memo
            # and are the same tensors for every layer of a step: copy them
            # once per step, not once per layer
            if piece == "qkv" and i > 0 and last[i] is x:
                continue
            buf[:T].copy_(x)
            last[i] = x
        graph.replay()
        return tuple(o[:T] for o in static_out)

    def _capture(self, piece: str, layer: int, bucket: int, inputs: tuple):
        """Capture ``piece`` of ``layer`` for ``bucket`` rows: one eager run on
        a side stream (lazy initialisations), then the capture on the same
        stream into the shared pool."""
        a = self.adapter
        fn = a._qkv if piece == "qkv" else a._out
        ikey = (piece, bucket) + tuple((x.dtype, tuple(x.shape[1:])) for x in inputs)
        shared = self.inputs.get(ikey)
        if shared is None:
            shared = self.inputs[ikey] = (tuple(
                torch.zeros((bucket,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
                for x in inputs), [None] * len(inputs))
        static_in, last = shared
        try:
            graph, out = capture_cuda_graph(lambda: fn(layer, *static_in), pool=self.pool,
                                            warm_up=True)
        except Exception as e:  # noqa: BLE001 - that piece runs eagerly
            self.failures += 1
            if self.failures == 1:
                logging.getLogger("kvblend").warning(
                    "kvblend: CUDA graph capture of %s (layer %d, %d rows) failed (%s: %s); "
                    "it runs eagerly", piece, layer, bucket, type(e).__name__, e)
            return None
        out = out if isinstance(out, tuple) else (out,)
        self.captures += 1
        return graph, static_in, out, last


def capture_cuda_graph(fn, pool=None, warm_up: bool = False):
    """Capture ``fn()`` into a CUDA graph on a side stream (ordered after
    the current stream's work; nothing runs during the capture itself) and
    return (graph, fn's output); replay it on any stream.  ``warm_up`` runs
    ``fn`` once eagerly on that stream first (lazy initialisations, which a
    capture cannot do) and waits for it.  ``pool``: a graph memory pool
    handle to share.  Errors propagate; the caller falls back to eager."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream(device=cur.device)
    side.wait_stream(cur)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            if warm_up:
                fn()
                side.synchronize()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
    finally:
        cur.wait_stream(side)
    return graph, out
