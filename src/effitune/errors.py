"""Errors that mean "the user can fix this": the CLI prints them without a traceback."""


class UserError(Exception):
    """A user mistake; the message names the file or value and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT); the message says how to go on."""


class EffituneWarning(UserWarning):
    """What effitune's library code warns about; `warnings.simplefilter("error", EffituneWarning)` makes
    each one an exception, and the CLI prints each as one `warning:` line."""
