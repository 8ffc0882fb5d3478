"""The one exception users see: a message that names what is wrong (file, node, input, expected vs got)."""


class NibbleError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
