"""How effitune tells its user something: errors the user can fix, warnings, progress lines.

- `UserError` / `ConfigError`: a mistake the user can fix; the CLI prints it without a traceback.
- `EffituneWarning` (through `warnings.warn`): something to act on; filter, catch or raise it like any
  warning. The CLI prints each as one `warning:` line.
- `Notify` callbacks: progress, one line per step (`notify=` of `train`, `split`, `tune`); by default
  the `effitune` logger's INFO, which is silent until logging is configured. The CLI prints them.
Library code never prints.
"""
from __future__ import annotations

import logging
from typing import Callable

Notify = Callable[[str], None]


class UserError(Exception):
    """A user mistake; the message names the file or value and the fix."""


class ConfigError(ValueError):
    """A user mistake in a config file or flag; the message names the key and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT); the message says how to go on."""


class EffituneWarning(UserWarning):
    """What effitune's library code warns about; `warnings.simplefilter("error", EffituneWarning)` makes
    each one an exception, and the CLI prints each as one `warning:` line."""


def notifier(notify: Notify | None) -> Notify:
    """`notify`, or the `effitune` logger's INFO when None."""
    return notify or logging.getLogger("effitune").info
