"""The one exception type the library raises for bad input; the CLI turns it into one line."""


class AprError(Exception):
    """A user-facing error: the message names the flag or file and what is wrong."""

    label = "error"  # what the CLI prints before the message

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
