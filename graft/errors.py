"""The one exception type graft raises for problems a user can fix (bad input, missing weights, bad config)."""


__all__ = ["GraftError"]


class GraftError(Exception):
    """A problem with the user's input or environment, worded as a one-line message that says what to do.

    The CLI prints the message alone (no traceback); library callers can catch it.
    """
