"""The one exception type graft raises for problems a user can fix (bad input, missing weights, bad config)."""


__all__ = ["GraftError"]


class GraftError(Exception):
    """A problem with the user's input or environment, worded as a one-line message that says what to do.

    The CLI prints the message alone (no traceback); library callers can catch it. Raised inside a DataLoader worker,
    torch re-raises it in the main process as ``GraftError("Caught GraftError in DataLoader worker ...\\nOriginal
    Traceback ...")``: that message is cut back to the worker's own line, so a file that breaks while loading reads
    the same with loader workers as without.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and _WORKER in args[0]:
            args = (_worker_line(args[0]),)
        super().__init__(*args)


_WORKER = "in DataLoader worker process"


def _worker_line(message: str) -> str:
    """The original message from torch's wrapped traceback: its last line, without the ``module.Class: `` prefix."""
    first, _, rest = message.partition("\n")
    if not first.startswith("Caught ") or not rest.startswith("Original Traceback"):
        return message
    last = rest.rstrip().rpartition("\n")[2]
    name, separator, text = last.partition(": ")
    return text if separator and name.replace(".", "").replace("_", "").isalnum() else last
