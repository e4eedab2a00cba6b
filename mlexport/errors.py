"""User-facing errors: one line that says what is wrong and how to fix it."""


class MlexportError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits 2, with no traceback."""
