"""kvdn for Python: the client SDK and the engine connector over libkvdn_c.so (kvdn_c.h).

    import kvdn
    client = kvdn.Client(kvdn.ModelSpec("llama-3-8b", 32, 8, 128, "bfloat16"))
    client.lookup(tokens)

kvdn.KvConnector and kvdn.PagedKvView (GPU engines) need PyTorch and a library built with CUDA.
"""

from .client import Client, LoadResult, ModelSpec, SaveResult
from .connector import KvConnector, LoadStats, PagedKvView, PagedLoad, PagedSave
from .errors import (AbortedError, DataLossError, DeadlineExceededError, FailedPreconditionError,
                     InternalError, InvalidArgumentError, KvdnError, NotFoundError,
                     PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                     UnavailableError)

__all__ = [
    "AbortedError", "Client", "DataLossError", "DeadlineExceededError", "FailedPreconditionError",
    "InternalError", "InvalidArgumentError", "KvConnector", "KvdnError", "LoadResult", "LoadStats",
    "ModelSpec", "NotFoundError", "PagedKvView", "PagedLoad", "PagedSave", "PermissionDeniedError",
    "ResourceExhaustedError", "SaveResult", "UnauthenticatedError", "UnavailableError",
]
