"""Errors that mean "the user can fix this": the CLI prints them without a traceback."""


class UserError(Exception):
    """A user mistake; the message names the file or value and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT); the message says how to go on."""
