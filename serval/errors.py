"""The one small error hierarchy of the project.

Every error a user can cause says *what* was wrong and *where*: the packet field, the
serviceID, the config file line. Callers catch `ServalError` to handle anything of ours.
"""

from __future__ import annotations


class ServalError(Exception):
    """Base class of every error raised by this project."""


class WireFormatError(ServalError):
    """A SAL packet could not be decoded or encoded; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ServiceIDError(ServalError, ValueError):
    """Malformed serviceID text or prefix length."""


class ServiceTableError(ServalError):
    """A service-table operation that cannot be applied (unknown rule, bad weight, ...)."""


class FlowStateError(ServalError):
    """An operation that is illegal in the flow's current state; nothing was changed."""


class RegistrationError(ServalError):
    """A registration that is unauthenticated, stale or malformed."""


class ConfigError(ServalError):
    """Invalid configuration; the message names the file, line and column when known."""


class RepairError(ServalError):
    """A TCP_REPAIR socket operation failed; `step` names the failing call."""

    def __init__(self, step: str, errno_: int, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.errno = errno_


class FlowIDError(ServalError, ValueError):
    """A flowID outside 1..2**32-1 (0 is reserved on the wire for "unknown")."""


class ControlProtocolError(ServalError):
    """A control-API frame broke the framing or the schema of docs/control-api.md.

    Raised on both sides (servald and clients) by serval.control; the message says what was
    wrong (length, JSON, field name and type, fd count). `framing_lost` is False when the
    frame itself was well delimited (bad JSON, a wrong field type): the connection can go on
    after an error response. Otherwise the byte stream is out of step and must be closed.
    """

    def __init__(self, message: str, *, framing_lost: bool = True) -> None:
        super().__init__(message)
        self.framing_lost = framing_lost


class ServalOSError(ServalError, OSError):
    """An OS-level failure reported by servald or met while talking to it.

    It carries `errno` like any OSError; the subclasses below are also the matching builtin
    exception, so `except ConnectionRefusedError` works on a Serval connect exactly as on a
    TCP one, and `except ServalError` catches everything of ours. The message names the
    serviceID (or the control socket path) concerned.
    """


class ServalConnectionRefusedError(ServalOSError, ConnectionRefusedError):
    """ECONNREFUSED: no instance accepted (or servald's control socket refused us)."""


class ServalConnectionResetError(ServalOSError, ConnectionResetError):
    """ECONNRESET: the flow was reset, e.g. by a full accept queue."""


class ServalConnectionAbortedError(ServalOSError, ConnectionAbortedError):
    """ECONNABORTED: servald abandoned the operation (shutting down, listener closed)."""


class ServalTimeoutError(ServalOSError, TimeoutError):
    """ETIMEDOUT: no answer within the timeout."""


class ServalFileNotFoundError(ServalOSError, FileNotFoundError):
    """ENOENT: typically servald is not running (no control socket at the path named)."""


class ServalPermissionError(ServalOSError, PermissionError):
    """EACCES/EPERM: e.g. the root-only control socket, or a service we may not bind."""


class ServalBlockingIOError(ServalOSError, BlockingIOError):
    """EAGAIN/EINPROGRESS/EALREADY on a non-blocking Serval socket."""


class ServalBrokenPipeError(ServalOSError, BrokenPipeError):
    """EPIPE: servald closed the control connection under us."""
