"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class EigpipeError(Exception):
    """An error caused by the user's input (config, data, checkpoint); the message names the culprit."""


class ConfigError(EigpipeError):
    """A config file or section that does not match the schema."""


class DataError(EigpipeError):
    """A dataset (annotation file, image, record) that cannot be used."""


class NumericalError(EigpipeError):
    """A non-finite loss or feature; the message names the iteration, layer or image."""


def whole(value: object) -> bool:
    """Whether a value is an int (a bool is not a number of anything)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_whole(name: str, value: object, least: int) -> None:
    """A one-line error unless ``value`` is a whole number >= ``least``."""
    if not whole(value) or value < least:
        raise EigpipeError(f"{name}: {value!r} is not a whole number >= {least}")


def one_line(message: object) -> str:
    """``message`` on one line: a line break inside it (a path that holds one) is written as ``\\n``."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")
