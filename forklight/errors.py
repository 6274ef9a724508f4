"""Errors in what the user gave: a config value, a data file, a record.

``forklight`` run as a program prints such an error as one line, ``forklight: error: <message>``,
and exits with status 2, as jsonargparse does for a config it cannot parse; any other exception
is a bug and keeps its traceback. ``FORKLIGHT_DEBUG=1`` shows the traceback of user errors too.
Messages say what is wrong, where (``file:line`` or the config key) and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message names it and says how to fix it."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names its key (e.g. ``data.init_args.max_length``)."""
