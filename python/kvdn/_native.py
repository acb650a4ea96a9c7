"""Loads libkvdn_c.so (client/include/kvdn/client/kvdn_c.h) and declares its functions for ctypes.

The library is looked for, in order: $KVDN_C_LIBRARY (a path), the path `cmake --install` wrote
into _install_path.py, then the dynamic loader's own search ("libkvdn_c.so").
"""

import ctypes
import os
import threading

ABI_VERSION = 2

# kvdn_status codes, by number (absl/gRPC status codes).
CODE_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

DTYPE_FLOAT16 = 1
DTYPE_BFLOAT16 = 2
DTYPE_FLOAT32 = 3

LAYOUT_NHD = 0
LAYOUT_NHD_COMBINED = 1
LAYOUT_HND = 2

DATA_PLANES = {"auto": 0, "grpc": 1, "ucx": 2}


class ClientOptions(ctypes.Structure):
    _fields_ = [
        ("target", ctypes.c_char_p),
        ("ns", ctypes.c_char_p),
        ("token", ctypes.c_char_p),
        ("model_name", ctypes.c_char_p),
        ("num_layers", ctypes.c_uint32),
        ("num_kv_heads", ctypes.c_uint32),
        ("head_dim", ctypes.c_uint32),
        ("dtype", ctypes.c_uint32),
        ("tokens_per_chunk", ctypes.c_uint32),
        ("deadline_seconds", ctypes.c_double),
        ("max_attempts", ctypes.c_int32),
        ("parallel_streams", ctypes.c_int32),
        ("data_plane", ctypes.c_int32),
        ("data_plane_lanes", ctypes.c_int32),
        ("part_bytes", ctypes.c_uint64),
        ("receive_pool_bytes", ctypes.c_uint64),
        ("ucx_transports", ctypes.c_char_p),
        ("tls_ca_file", ctypes.c_char_p),
        ("tls_cert_file", ctypes.c_char_p),
        ("tls_key_file", ctypes.c_char_p),
        ("tls_server_name", ctypes.c_char_p),
    ]


class SaveResultC(ctypes.Structure):
    _fields_ = [
        ("chunks_stored", ctypes.c_size_t),
        ("chunks_present", ctypes.c_size_t),
        ("bytes_sent", ctypes.c_uint64),
    ]


class LoadResultC(ctypes.Structure):
    _fields_ = [
        ("tokens", ctypes.c_size_t),
        ("chunks", ctypes.c_size_t),
        ("bytes", ctypes.c_uint64),
    ]


class PagedLayer(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("layout", ctypes.c_int32),
        ("num_blocks", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
    ]


class PagedView(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.POINTER(PagedLayer)),
        ("num_layers", ctypes.c_size_t),
        ("block_table", ctypes.c_void_p),
        ("block_table_len", ctypes.c_int32),
    ]


class LoadStatsC(ctypes.Structure):
    _fields_ = [
        ("gpu_tier_chunks", ctypes.c_size_t),
        ("descriptors", ctypes.c_double),
        ("lookup", ctypes.c_double),
        ("fetch", ctypes.c_double),
        ("stall", ctypes.c_double),
        ("enqueue", ctypes.c_double),
        ("host_tier_chunks", ctypes.c_size_t),
    ]


class ConnectorOptions(ctypes.Structure):
    _fields_ = [
        ("host_staging_bytes", ctypes.c_uint64),
        ("device_staging_bytes", ctypes.c_uint64),
        ("l2_prefetch_bytes", ctypes.c_uint64),
        ("use_gpu_tier", ctypes.c_int32),
        ("map_host_tier", ctypes.c_int32),
    ]


_P = ctypes.c_void_p
_I32P = ctypes.POINTER(ctypes.c_int32)
_U64P = ctypes.POINTER(ctypes.c_uint64)
_SIZE = ctypes.c_size_t

_PROTOTYPES = {
    "kvdn_abi_version": (ctypes.c_int, []),
    "kvdn_last_error": (ctypes.c_char_p, []),
    "kvdn_client_options_init": (None, [ctypes.POINTER(ClientOptions)]),
    "kvdn_client_connect": (ctypes.c_int, [ctypes.POINTER(ClientOptions), ctypes.POINTER(_P)]),
    "kvdn_client_close": (None, [_P]),
    "kvdn_client_lookup": (ctypes.c_int, [_P, _P, _SIZE, ctypes.POINTER(_SIZE)]),
    "kvdn_client_chunk_payload_sizes": (ctypes.c_int, [_P, _SIZE, _U64P, _SIZE,
                                                       ctypes.POINTER(_SIZE)]),
    "kvdn_client_save": (ctypes.c_int, [_P, _P, _SIZE, ctypes.POINTER(_P), _U64P, _SIZE, _SIZE,
                                        ctypes.POINTER(SaveResultC)]),
    "kvdn_client_load": (ctypes.c_int, [_P, _P, _SIZE, ctypes.POINTER(_P), _U64P, _SIZE, _SIZE,
                                        ctypes.POINTER(LoadResultC)]),
    "kvdn_client_data_plane": (ctypes.c_int, [_P, ctypes.c_char_p, _SIZE]),
    "kvdn_connector_options_init": (None, [ctypes.POINTER(ConnectorOptions)]),
    "kvdn_connector_create": (ctypes.c_int, [_P, ctypes.POINTER(ConnectorOptions),
                                             ctypes.POINTER(_P)]),
    "kvdn_connector_free": (None, [_P]),
    "kvdn_connector_start_load": (ctypes.c_int, [_P, _P, _SIZE, ctypes.POINTER(PagedView),
                                                 ctypes.POINTER(_P)]),
    "kvdn_load_wait_layer": (ctypes.c_int, [_P, ctypes.c_int32, _P]),
    "kvdn_load_wait": (ctypes.c_int, [_P, ctypes.POINTER(LoadResultC)]),
    "kvdn_load_get_stats": (ctypes.c_int, [_P, ctypes.POINTER(LoadStatsC)]),
    "kvdn_load_free": (None, [_P]),
    "kvdn_connector_save": (ctypes.c_int, [_P, _P, _SIZE, ctypes.POINTER(PagedView), _P,
                                           ctypes.POINTER(SaveResultC)]),
    "kvdn_connector_start_save": (ctypes.c_int, [_P, _P, _SIZE, ctypes.POINTER(PagedView), _P,
                                                 ctypes.POINTER(_P)]),
    "kvdn_save_done": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int32)]),
    "kvdn_save_wait": (ctypes.c_int, [_P, ctypes.POINTER(SaveResultC)]),
    "kvdn_save_free": (None, [_P]),
}

_lock = threading.Lock()
_lib = None


def _candidates():
    env = os.environ.get("KVDN_C_LIBRARY")
    if env:
        return [env]
    out = []
    try:
        from . import _install_path  # written by `cmake --install`

        out.append(_install_path.LIBRARY)
    except ImportError:
        pass
    out.append("libkvdn_c.so")
    return out


def lib():
    """The loaded library (loaded on first use). OSError when it cannot be found or is of another
    ABI version."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        errors = []
        for path in _candidates():
            try:
                candidate = ctypes.CDLL(path)
                break
            except OSError as e:
                errors.append(f"{path}: {e}")
        else:
            raise OSError(
                "kvdn: libkvdn_c.so not found (set KVDN_C_LIBRARY to its path, e.g. "
                "build/default/lib/libkvdn_c.so, or `cmake --install` kvdn): " + "; ".join(errors))
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(candidate, name)
            fn.restype = restype
            fn.argtypes = argtypes
        version = candidate.kvdn_abi_version()
        if version != ABI_VERSION:
            raise OSError(f"kvdn: {path} has C ABI version {version}; this package needs "
                          f"{ABI_VERSION} (rebuild kvdn or use its own python/ package)")
        _lib = candidate
        return _lib
