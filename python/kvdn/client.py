"""kvdn.Client: the SDK's Client (client/include/kvdn/client/client.h) for Python.

    import kvdn
    model = kvdn.ModelSpec("llama-3-8b", num_layers=32, num_kv_heads=8, head_dim=128,
                           dtype="bfloat16")
    with kvdn.Client(model, namespace="tenant-a") as c:
        cached = c.lookup(tokens)                # tokens whose KV is stored
        c.save(tokens, payloads)                 # chunk payloads (bytes-like), from chunk 0
        chunks = c.load_bytes(tokens)            # the stored prefix's payloads

A chunk's payload is its KV laid out layer-major [layer][K|V][token][kv_head][dim]; its size is
chunk_payload_sizes(len(tokens))[i]. Tokens are any sequence of ints (lists, array('i'), numpy or
CPU torch int32 arrays are passed without copying). Errors raise kvdn.KvdnError subclasses
(kvdn.errors) carrying the daemon's message.
"""

import array
import ctypes
import weakref
from dataclasses import dataclass

from . import _native
from .errors import check

_DTYPES = {
    "float16": _native.DTYPE_FLOAT16,
    "fp16": _native.DTYPE_FLOAT16,
    "half": _native.DTYPE_FLOAT16,
    "bfloat16": _native.DTYPE_BFLOAT16,
    "bf16": _native.DTYPE_BFLOAT16,
    "float32": _native.DTYPE_FLOAT32,
    "fp32": _native.DTYPE_FLOAT32,
}


def dtype_code(dtype):
    """kvdn's code for a dtype given as a name ("bfloat16", "float16", "float32"), a torch dtype,
    or a code. ValueError for anything else."""
    if isinstance(dtype, int):
        return dtype
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(set(_DTYPES))}")
    return _DTYPES[name]


@dataclass(frozen=True)
class ModelSpec:
    """The model whose KV a client moves (kvdn::ModelSpec); chunks of different specs never
    match."""
    model_name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: object = "bfloat16"
    tokens_per_chunk: int = 256


@dataclass(frozen=True)
class SaveResult:
    chunks_stored: int   # sent and committed now
    chunks_present: int  # already stored (by anyone): skipped
    bytes_sent: int


@dataclass(frozen=True)
class LoadResult:
    tokens: int  # tokens whose KV is now in the buffers, from the first chunk on
    chunks: int
    bytes: int


class _Tokens:
    """A pointer to int32 tokens, holding what keeps it valid."""

    def __init__(self, tokens):
        self.keep = None
        if hasattr(tokens, "data_ptr") and hasattr(tokens, "is_contiguous"):  # torch.Tensor
            if tokens.device.type != "cpu" or str(tokens.dtype) != "torch.int32" or \
                    not tokens.is_contiguous() or tokens.dim() != 1:
                tokens = tokens.to("cpu", copy=False).reshape(-1).to(dtype=_torch_int32(),
                                                                       copy=False).contiguous()
            self.keep = tokens
            self.ptr = tokens.data_ptr()
            self.n = tokens.numel()
            return
        try:
            view = memoryview(tokens)
        except TypeError:
            view = None
        if view is not None and view.format in ("i", "<i", "=i") and view.itemsize == 4 and \
                view.c_contiguous and view.ndim == 1:
            if view.readonly:
                buf = array.array("i", view.tobytes())
            else:
                buf = view
            self.keep = buf
            self.n = len(buf)
            self.ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if self.n else None
            return
        try:
            buf = array.array("i", tokens)
        except (TypeError, OverflowError) as e:
            raise TypeError(f"tokens must be a sequence of int32 token ids: {e}") from None
        self.keep = buf
        self.n = len(buf)
        self.ptr = buf.buffer_info()[0] if self.n else None


def _torch_int32():
    import torch

    return torch.int32


def _address(obj, writable):
    """(address, size in bytes, keep-alive) of a bytes-like object or a CPU torch tensor."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):
        if obj.device.type != "cpu" or not obj.is_contiguous():
            raise TypeError("a torch tensor payload must be a contiguous CPU tensor")
        return obj.data_ptr(), obj.numel() * obj.element_size(), obj
    if isinstance(obj, bytes):
        if writable:
            raise TypeError("bytes are read-only: give a bytearray or another writable buffer")
        return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value, len(obj), obj
    view = memoryview(obj)
    if not view.c_contiguous:
        raise TypeError("a payload buffer must be C-contiguous")
    view = view.cast("B")
    if view.readonly:
        if writable:
            raise TypeError("a load buffer must be writable")
        data = view.tobytes()
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value, len(data), data
    if len(view) == 0:
        return None, 0, view
    return ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view), view


def _buffer_arrays(objs, writable):
    """(count, C array of addresses, C array of sizes, what keeps them valid) of buffers."""
    addrs = [_address(o, writable) for o in objs]
    n = len(addrs)
    return (n, (ctypes.c_void_p * n)(*[a[0] for a in addrs]),
            (ctypes.c_uint64 * n)(*[a[1] for a in addrs]), addrs)


class Client:
    """A connection to kvdnd (lazy: an absent daemon shows as UnavailableError on the first call).
    Thread-safe; close() (or `with`) releases it. The keyword options are ClientOptions' (client.h);
    tls_* are TlsOptions' (TLS to a TCP target of a kvdnd with `tls`)."""

    def __init__(self, model, *, target=None, namespace="default", token=None, deadline=10.0,
                 max_attempts=None, parallel_streams=0, data_plane="auto", data_plane_lanes=0,
                 part_bytes=None, receive_pool_bytes=0, ucx_transports=None, tls_ca_file=None,
                 tls_cert_file=None, tls_key_file=None, tls_server_name=None):
        lib = _native.lib()
        o = _native.ClientOptions()
        lib.kvdn_client_options_init(ctypes.byref(o))
        self._strings = []  # the option strings, alive through the call

        def s(value):
            if value is None:
                return None
            b = str(value).encode()
            self._strings.append(b)
            return b

        if data_plane not in _native.DATA_PLANES:
            raise ValueError(f"data_plane {data_plane!r} is not one of {list(_native.DATA_PLANES)}")
        o.target = s(target)
        o.ns = s(namespace)
        o.token = s(token)
        o.model_name = s(model.model_name)
        o.num_layers = model.num_layers
        o.num_kv_heads = model.num_kv_heads
        o.head_dim = model.head_dim
        o.dtype = dtype_code(model.dtype)
        o.tokens_per_chunk = model.tokens_per_chunk
        o.deadline_seconds = float(deadline)
        if max_attempts is not None:
            o.max_attempts = max_attempts
        o.parallel_streams = parallel_streams
        o.data_plane = _native.DATA_PLANES[data_plane]
        o.data_plane_lanes = data_plane_lanes
        if part_bytes is not None:
            o.part_bytes = part_bytes
        o.receive_pool_bytes = receive_pool_bytes
        o.ucx_transports = s(ucx_transports)
        o.tls_ca_file = s(tls_ca_file)
        o.tls_cert_file = s(tls_cert_file)
        o.tls_key_file = s(tls_key_file)
        o.tls_server_name = s(tls_server_name)
        handle = ctypes.c_void_p()
        check(lib.kvdn_client_connect(ctypes.byref(o), ctypes.byref(handle)))
        self._lib = lib
        self._handle = handle
        self._dependents = weakref.WeakSet()  # connectors over this client, closed before it
        self.model = model
        self.namespace = namespace

    @property
    def handle(self):
        if not self._handle:
            raise ValueError("kvdn.Client is closed")
        return self._handle

    def close(self):
        """Closes the connection, after closing the connectors made over it."""
        if getattr(self, "_handle", None):
            for dependent in list(self._dependents):
                dependent.close()
            self._lib.kvdn_client_close(self._handle)
            self._handle = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def lookup(self, tokens):
        """Tokens, from the start of `tokens`, whose KV is stored."""
        t = _Tokens(tokens)
        matched = ctypes.c_size_t()
        check(self._lib.kvdn_client_lookup(self.handle, t.ptr, t.n, ctypes.byref(matched)))
        return matched.value

    def chunk_payload_sizes(self, num_tokens):
        """Payload bytes of each chunk covering num_tokens tokens (the last may be shorter)."""
        count = ctypes.c_size_t()
        check(self._lib.kvdn_client_chunk_payload_sizes(self.handle, num_tokens, None, 0,
                                                        ctypes.byref(count)))
        sizes = (ctypes.c_uint64 * count.value)()
        check(self._lib.kvdn_client_chunk_payload_sizes(self.handle, num_tokens, sizes,
                                                        count.value, ctypes.byref(count)))
        return list(sizes)

    def save(self, tokens, payloads, first_chunk=0):
        """Stores payloads[j] as chunk first_chunk + j of tokens (chunks already stored are
        skipped). InvalidArgumentError for more payloads than chunks or a payload of the wrong
        size."""
        t = _Tokens(tokens)
        n, ptrs, sizes, _keep = _buffer_arrays(payloads, writable=False)
        out = _native.SaveResultC()
        check(self._lib.kvdn_client_save(self.handle, t.ptr, t.n, ptrs, sizes, n, first_chunk,
                                          ctypes.byref(out)))
        return SaveResult(out.chunks_stored, out.chunks_present, out.bytes_sent)

    def load_into(self, tokens, buffers, first_chunk=0):
        """Loads the longest stored run of chunks from first_chunk on (at most len(buffers)),
        chunk first_chunk + j into buffers[j] (writable, chunk_payload_sizes' size). DataLossError:
        a chunk failed verification and no buffer is to be used."""
        t = _Tokens(tokens)
        n, ptrs, sizes, _keep = _buffer_arrays(buffers, writable=True)
        out = _native.LoadResultC()
        check(self._lib.kvdn_client_load(self.handle, t.ptr, t.n, ptrs, sizes, n, first_chunk,
                                          ctypes.byref(out)))
        return LoadResult(out.tokens, out.chunks, out.bytes)

    def load_bytes(self, tokens, first_chunk=0):
        """The payloads of the longest stored run of chunks of tokens from first_chunk on, as
        bytearrays (an empty list when none is stored)."""
        sizes = self.chunk_payload_sizes(len(tokens))[first_chunk:]
        buffers = [bytearray(s) for s in sizes]
        result = self.load_into(tokens, buffers, first_chunk)
        return buffers[:result.chunks]

    @property
    def data_plane(self):
        """What payloads travel over now: "grpc", or "ucx: <transports>"."""
        buf = ctypes.create_string_buffer(256)
        check(self._lib.kvdn_client_data_plane(self.handle, buf, len(buf)))
        return buf.value.decode()
