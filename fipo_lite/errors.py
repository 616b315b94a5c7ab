"""The one exception type for mistakes in what the user gave us (config, data, model path, checkpoint).

The commands print its message as one line (`error: ...`) and exit with status 2; anything else
is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A bad input the user can fix; the message names it and, where possible, what to change."""
