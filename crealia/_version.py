"""The version of crealia (one place: the package, the CLI and the OpenAPI document read it)."""

__version__ = "0.1.0"
