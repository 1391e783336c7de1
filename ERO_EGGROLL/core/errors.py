"""The one base class of every error this project raises for input it cannot use.

Each such error carries one line that says what was wrong, where, and what to do; the entry points
print that line and exit with code 2 (a traceback is kept for real bugs). `ConfigError` is the core's
own: settings or a tensor classification that cannot run.
"""


class EggrollError(ValueError):
    """Bad input or a refused operation, explained in one line."""


class ConfigError(EggrollError):
    """Settings that cannot run, naming the setting and what to do."""
