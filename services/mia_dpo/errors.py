"""Small named exceptions. Anything a user can fix is a UserError: the CLI prints
its message on one line and exits 2, without a traceback."""


class UserError(Exception):
    """Bad input from the user: config, data files, CLI arguments."""


class NotFound(KeyError):
    """A key is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class TransientStoreError(OSError):
    """The store stayed unreachable longer than its retry budget."""


class SampleError(ValueError):
    """A source sample cannot be used. `reason` is the stats key, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
