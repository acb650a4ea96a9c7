"""kvdn's exceptions: one per status code a caller acts on (STYLE.md 2), all KvdnError."""

from . import _native


class KvdnError(Exception):
    """A kvdn call failed. `code` is the status code's number, `code_name` its name (e.g.
    "INVALID_ARGUMENT"), `message` what was wrong."""

    def __init__(self, code, message):
        self.code = code
        self.code_name = _native.CODE_NAMES.get(code, f"CODE_{code}")
        self.message = message
        super().__init__(f"{self.code_name}: {message}")


class InvalidArgumentError(KvdnError):
    """The call's arguments are wrong (a caller bug)."""


class NotFoundError(KvdnError):
    pass


class PermissionDeniedError(KvdnError):
    """The token does not grant what the call needs (e.g. the namespace)."""


class UnauthenticatedError(KvdnError):
    """No token, or one the daemon does not know."""


class ResourceExhaustedError(KvdnError):
    pass


class FailedPreconditionError(KvdnError):
    pass


class AbortedError(KvdnError):
    pass


class UnavailableError(KvdnError):
    """The daemon cannot be reached (already retried within the deadline)."""


class DeadlineExceededError(KvdnError):
    pass


class DataLossError(KvdnError):
    """A chunk failed its checksum: nothing loaded by the call is to be used."""


class InternalError(KvdnError):
    pass


_BY_CODE = {
    3: InvalidArgumentError,
    4: DeadlineExceededError,
    5: NotFoundError,
    7: PermissionDeniedError,
    8: ResourceExhaustedError,
    9: FailedPreconditionError,
    10: AbortedError,
    13: InternalError,
    14: UnavailableError,
    15: DataLossError,
    16: UnauthenticatedError,
}


def check(code):
    """Raises the error for a status code from the library (with the thread's message)."""
    if code == 0:
        return
    message = _native.lib().kvdn_last_error().decode("utf-8", "replace")
    raise _BY_CODE.get(code, KvdnError)(code, message)
