"""Errors a user can act on. The CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Base class for problems with the user's input (config, data, files)."""


class ConfigError(UserError):
    """A config field is unknown, has the wrong type, or is out of range."""

    def __init__(self, field: str, expected: str, got: object = None, *, show_got: bool = True):
        self.field = field
        self.expected = expected
        message = f"config field '{field}': expected {expected}"
        if show_got:
            message += f", got {got!r}"
        super().__init__(message)


class ConfigFileError(UserError):
    """A config file is missing or is not valid YAML."""


class DataError(UserError):
    """A dataset is missing or malformed."""


class ParentFileError(UserError):
    """A parent weights file is missing, unreadable, or does not fit the architecture."""


class RunDirError(UserError):
    """A run directory is missing, already used, or malformed."""


class ExportError(UserError):
    """An ensemble cannot be exported as asked: unknown format, unwritable path, missing package, or an
    architecture the format's exporter cannot capture."""


class DivergedError(UserError):
    """Every candidate of a generation diverged (non-finite validation metrics): the settings break the
    children, so the search cannot go on."""
