"""The error every check of the contract raises: a message and the option (`param`) it is about.

Its own module so that the torch-free, pydantic-free parts (the base-model facts, the memory estimate) can raise it
without importing the options model."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid option or combination of options. `param` names the option."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_hyperparameter"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
