"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class EigpipeError(Exception):
    """An error caused by the user's input (config, data, checkpoint); the message names the culprit."""


class ConfigError(EigpipeError):
    """A config file or section that does not match the schema."""


class DataError(EigpipeError):
    """A dataset (annotation file, image, record) that cannot be used."""


class NumericalError(EigpipeError):
    """A non-finite loss or feature; the message names the iteration, layer or image."""
