"""kvdn.KvConnector: the engine connector (client/include/kvdn/client/kv_connector.h) for PyTorch
engines: loads a request's stored prefix straight into the engine's paged KV cache on the GPU,
layer by layer, and saves a request's KV from it.

    conn = kvdn.KvConnector(client)                       # on torch.cuda.current_device()
    view = kvdn.PagedKvView.from_vllm(kv_caches, block_table)
    load = conn.start_load(tokens, view)                  # returns at once
    for layer in range(num_layers):
        load.wait_layer(layer)                            # the current stream waits on the GPU
        ...attention(layer)...
    result = load.wait()                                  # result.tokens now in the cache
    conn.save(tokens, view)                               # after the forward pass

A view borrows the engine's tensors (it keeps references to them): the cache tensors of every
layer, in order, and the request's block table (int32 block ids on the GPU, one per block of the
request's positions). Layouts: vLLM's FlashAttention `[2, num_blocks, block_size, H_kv, D]` per
layer (from_vllm), vLLM NHD K and V tensors `[num_blocks, block_size, H_kv, D]` (from_nhd), the
combined `[num_blocks, 2, block_size, H_kv, D]` (from_nhd_combined; vLLM's FlashInfer backend),
FlashInfer/SGLang HND `[pages, H_kv, page_size, D]` (from_hnd; SGLang's token pools are
`[tokens, H_kv, D]`: pages of one token, from_nhd with block_size 1 after unsqueeze(1)).
"""

import ctypes
import weakref
from dataclasses import dataclass

from . import _native
from .client import LoadResult, SaveResult, _Tokens, dtype_code
from .errors import check


def _torch():
    import torch

    return torch


def _stream_handle(stream):
    torch = _torch()
    if stream is None:
        stream = torch.cuda.current_stream()
    if isinstance(stream, int):
        return stream
    return stream.cuda_stream


class PagedKvView:
    """The engine's paged KV cache for one request (kvdn::client::PagedKvView). Build it with one of
    the from_* constructors; they check what ctypes cannot (CUDA tensors, contiguity, dtypes,
    shapes) and raise ValueError saying which tensor is wrong."""

    def __init__(self, layers, keep, block_table):
        self._keep = keep
        bt = block_table
        if not (hasattr(bt, "is_cuda") and bt.is_cuda):
            raise ValueError("block_table must be a CUDA tensor")
        if str(bt.dtype) != "torch.int32" or bt.dim() != 1 or not bt.is_contiguous():
            raise ValueError(f"block_table must be a contiguous 1-D torch.int32 tensor, got "
                             f"{bt.dtype} of shape {tuple(bt.shape)}")
        self.block_table = bt
        self._layers = (_native.PagedLayer * len(layers))(*layers)
        self.c = _native.PagedView(self._layers, len(layers), bt.data_ptr(), bt.numel())

    @staticmethod
    def _check(name, t, dims):
        if not (hasattr(t, "is_cuda") and t.is_cuda):
            raise ValueError(f"{name} must be a CUDA tensor")
        if t.dim() != dims:
            raise ValueError(f"{name} has {t.dim()} dimensions; this layout has {dims}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    @classmethod
    def _separate(cls, k_caches, v_caches, block_table, layout, name):
        if len(k_caches) != len(v_caches):
            raise ValueError(f"{len(k_caches)} K tensors but {len(v_caches)} V tensors")
        layers = []
        for i, (k, v) in enumerate(zip(k_caches, v_caches)):
            cls._check(f"k_caches[{i}]", k, 4)
            cls._check(f"v_caches[{i}]", v, 4)
            if k.shape != v.shape or k.dtype != v.dtype:
                raise ValueError(f"layer {i}: K is {tuple(k.shape)} {k.dtype}, V is "
                                 f"{tuple(v.shape)} {v.dtype}")
            if layout == _native.LAYOUT_NHD:
                blocks, block_size, heads, dim = k.shape
            else:
                blocks, heads, block_size, dim = k.shape
            layers.append(_native.PagedLayer(k.data_ptr(), v.data_ptr(), layout, blocks,
                                             block_size, heads, dim, dtype_code(k.dtype)))
        return cls(layers, (list(k_caches), list(v_caches)), block_table)

    @classmethod
    def from_nhd(cls, k_caches, v_caches, block_table):
        """vLLM NHD: per layer, K and V tensors [num_blocks, block_size, num_kv_heads, head_dim]."""
        return cls._separate(k_caches, v_caches, block_table, _native.LAYOUT_NHD, "nhd")

    @classmethod
    def from_hnd(cls, k_caches, v_caches, block_table):
        """FlashInfer/SGLang HND: per layer, K and V tensors [pages, num_kv_heads, page_size,
        head_dim]."""
        return cls._separate(k_caches, v_caches, block_table, _native.LAYOUT_HND, "hnd")

    @classmethod
    def from_vllm(cls, kv_caches, block_table):
        """vLLM's FlashAttention backend: per layer one tensor [2, num_blocks, block_size,
        num_kv_heads, head_dim] (K at [0], V at [1])."""
        for i, kv in enumerate(kv_caches):
            cls._check(f"kv_caches[{i}]", kv, 5)
            if kv.shape[0] != 2:
                raise ValueError(f"kv_caches[{i}] has shape {tuple(kv.shape)}; vLLM's "
                                 f"FlashAttention layout is [2, num_blocks, block_size, "
                                 f"num_kv_heads, head_dim]")
        view = cls.from_nhd([kv[0] for kv in kv_caches], [kv[1] for kv in kv_caches],
                            block_table)
        view._keep = list(kv_caches)
        return view

    @classmethod
    def from_nhd_combined(cls, kv_caches, block_table):
        """Per layer one tensor [num_blocks, 2, block_size, num_kv_heads, head_dim]."""
        layers = []
        for i, kv in enumerate(kv_caches):
            cls._check(f"kv_caches[{i}]", kv, 5)
            blocks, two, block_size, heads, dim = kv.shape
            if two != 2:
                raise ValueError(f"kv_caches[{i}] has shape {tuple(kv.shape)}; the combined "
                                 f"layout is [num_blocks, 2, block_size, num_kv_heads, head_dim]")
            layers.append(_native.PagedLayer(kv.data_ptr(), None, _native.LAYOUT_NHD_COMBINED,
                                             blocks, block_size, heads, dim, dtype_code(kv.dtype)))
        return cls(layers, list(kv_caches), block_table)


@dataclass(frozen=True)
class LoadStats:
    """Where a load's chunks came from and its host time went (seconds)."""
    gpu_tier_chunks: int  # read in place from kvdnd's GPU tier (CUDA IPC)
    descriptors: float    # leasing chunks in the GPU tier and the mapped host tier
    lookup: float         # waiting for the prefix lookup
    fetch: float          # fetching chunks from kvdnd into host staging
    stall: float          # waiting for a staging half's copies to the GPU
    enqueue: float        # enqueuing copies and kernels
    host_tier_chunks: int = 0  # injected straight out of kvdnd's host tier (mapped)


class PagedLoad:
    """One load in flight (kvdn::client::PagedLoad). Used by one thread at a time."""

    def __init__(self, lib, handle, connector, view, tokens):
        self._lib = lib
        self._handle = handle
        self._connector = connector  # freed after its loads (the C interface's order)
        self._view = view            # the cache and block table, alive while the load runs
        self._tokens = tokens        # the token array, alive while the load runs

    def _live(self):
        if not self._handle:
            raise ValueError("kvdn.PagedLoad is closed (or its connector is)")
        return self._handle

    def wait_layer(self, layer, stream=None):
        """Blocks until layer `layer`'s copies are enqueued, then makes `stream` (default: torch's
        current stream; a torch.cuda.Stream or a raw handle) wait for them on the GPU. Raises the
        load's error if it failed."""
        check(self._lib.kvdn_load_wait_layer(self._live(), layer, _stream_handle(stream)))

    def wait(self):
        """Blocks until the whole load is copied; the tokens now in the cache (a prefix of the
        request's). DataLossError: a chunk failed its checksum; nothing of the load is to be
        used."""
        out = _native.LoadResultC()
        check(self._lib.kvdn_load_wait(self._live(), ctypes.byref(out)))
        return LoadResult(out.tokens, out.chunks, out.bytes)

    def stats(self):
        """After wait(): where the chunks came from and the host time went (a LoadStats)."""
        out = _native.LoadStatsC()
        check(self._lib.kvdn_load_get_stats(self._live(), ctypes.byref(out)))
        return LoadStats(out.gpu_tier_chunks, out.descriptors, out.lookup, out.fetch, out.stall,
                         out.enqueue, out.host_tier_chunks)

    def close(self):
        if getattr(self, "_handle", None):
            self._lib.kvdn_load_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


class PagedSave:
    """One save in flight (kvdn::client::PagedSave): its gather out of the cache is ordered
    before the work enqueued next on the engine's stream; the stores into kvdnd run behind."""

    def __init__(self, lib, handle, connector, view):
        self._lib = lib
        self._handle = handle
        self._connector = connector  # freed after its saves (the C interface's order)
        self._view = view            # the cache and block table, alive while the save runs

    def _live(self):
        if not self._handle:
            raise ValueError("kvdn.PagedSave is closed (or its connector is)")
        return self._handle

    def done(self):
        """Whether the save has ended (stored, or failed); never blocks."""
        flag = ctypes.c_int32()
        check(self._lib.kvdn_save_done(self._live(), ctypes.byref(flag)))
        return bool(flag.value)

    def wait(self):
        """Blocks until the save ends: a SaveResult, or the save's error raised (chunks stored
        before it stay, each whole and verified)."""
        out = _native.SaveResultC()
        check(self._lib.kvdn_save_wait(self._live(), ctypes.byref(out)))
        return SaveResult(out.chunks_stored, out.chunks_present, out.bytes_sent)

    def close(self):
        """Waits for the save to end, then frees it."""
        if getattr(self, "_handle", None):
            self._lib.kvdn_save_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


class KvConnector:
    """Staging memory and a stream on torch's current CUDA device; loads and saves' gathers run
    one at a time, in the order started, and saves' stores beside them on a thread of their own.
    Close it (or drop it) before its client."""

    def __init__(self, client, *, host_staging_bytes=None, device_staging_bytes=None,
                 l2_prefetch_bytes=None, use_gpu_tier=None, map_host_tier=None):
        lib = _native.lib()
        torch = _torch()
        torch.cuda.init()
        o = _native.ConnectorOptions()
        lib.kvdn_connector_options_init(ctypes.byref(o))
        if host_staging_bytes is not None:
            o.host_staging_bytes = host_staging_bytes
        if device_staging_bytes is not None:
            o.device_staging_bytes = device_staging_bytes
        if l2_prefetch_bytes is not None:
            o.l2_prefetch_bytes = l2_prefetch_bytes
        if use_gpu_tier is not None:
            o.use_gpu_tier = 1 if use_gpu_tier else 0
        if map_host_tier is not None:
            o.map_host_tier = 1 if map_host_tier else 0
        handle = ctypes.c_void_p()
        check(lib.kvdn_connector_create(client.handle, ctypes.byref(o), ctypes.byref(handle)))
        self._lib = lib
        self._handle = handle
        self._client = client  # outlives the connector
        self._loads = weakref.WeakSet()
        self._saves = weakref.WeakSet()
        client._dependents.add(self)

    def _live(self):
        if not self._handle:
            raise ValueError("kvdn.KvConnector is closed (or its client is)")
        return self._handle

    def close(self):
        """Frees the connector, after closing its loads (each waits for its enqueuing) and saves
        (each waits for its stores)."""
        if getattr(self, "_handle", None):
            for load in list(self._loads):
                load.close()
            for save in list(self._saves):
                save.close()
            self._lib.kvdn_connector_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()

    def start_load(self, tokens, view):
        """Starts loading the longest stored prefix of tokens into the view; returns at once.
        InvalidArgumentError naming what is wrong with the view (layer count, a layer's shape,
        dtype or block size, a block table too short for the tokens)."""
        t = _Tokens(tokens)
        handle = ctypes.c_void_p()
        check(self._lib.kvdn_connector_start_load(self._live(), t.ptr, t.n, ctypes.byref(view.c),
                                                  ctypes.byref(handle)))
        load = PagedLoad(self._lib, handle, self, view, t)
        self._loads.add(load)
        return load

    def load(self, tokens, view):
        """start_load then wait: the whole load is in the cache when it returns."""
        load = self.start_load(tokens, view)
        try:
            return load.wait()
        finally:
            load.close()

    def save(self, tokens, view, stream=None):
        """Stores the KV of tokens from the view once the work on `stream` (default: torch's
        current stream) so far is done: chunks past the stored prefix. Blocks until stored."""
        t = _Tokens(tokens)
        out = _native.SaveResultC()
        check(self._lib.kvdn_connector_save(self._live(), t.ptr, t.n, ctypes.byref(view.c),
                                            _stream_handle(stream), ctypes.byref(out)))
        return SaveResult(out.chunks_stored, out.chunks_present, out.bytes_sent)

    def start_save(self, tokens, view, stream=None):
        """save() without waiting for the stores: returns a PagedSave once the chunks past the
        stored prefix are being gathered out of the cache, with `stream` (default: torch's current
        stream) made to wait for that gather on the GPU, so the engine may reuse or free the
        blocks at once. A save larger than the host staging (host_staging_bytes) blocks here
        until its excess is stored. Errors found before the gather (the view, a block table
        entry outside the cache, kvdnd unreachable) raise here; later ones from wait()."""
        t = _Tokens(tokens)
        handle = ctypes.c_void_p()
        check(self._lib.kvdn_connector_start_save(self._live(), t.ptr, t.n, ctypes.byref(view.c),
                                                  _stream_handle(stream), ctypes.byref(handle)))
        save = PagedSave(self._lib, handle, self, view)
        self._saves.add(save)
        return save
