"""The one exception type for user mistakes: the CLI prints its message as one line, exit code 2."""


class UserError(Exception):
    """Bad input from a user (a flag, a config value, a rule expression, a missing file).

    The message must say what is wrong and what is valid; the CLI prints it without a traceback.
    """


class SameOnEveryRank(UserError):
    """A mistake every process of a job finds alike: only rank 0 prints it."""
