"""Exceptions that the CLI turns into one-line messages and a non-zero exit."""


class LiflowError(Exception):
    """A user-facing error: bad input, missing credential, corrupt file.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """


class InputError(LiflowError):
    """Malformed, disordered or otherwise unusable input (CIF, manifest, config)."""


class SchemaError(LiflowError):
    """A Parquet file that is unreadable or does not match the expected schema."""


class ConfigError(LiflowError):
    """An unknown, ill-typed or inconsistent configuration key."""
