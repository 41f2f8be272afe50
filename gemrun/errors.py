"""One error family: every user-facing failure is a `GemrunError` whose message names the field or limit."""


class GemrunError(Exception):
    """Base class of gemrun's clean errors (the CLI prints the message and exits non-zero)."""


class ConfigError(GemrunError):
    """A config value is missing, of the wrong type or inconsistent."""


class WeightsError(GemrunError):
    """A checkpoint file is malformed, truncated, or does not match the model."""


class TokenizerError(GemrunError):
    """A tokenizer file is malformed or inconsistent."""


class TemplateError(GemrunError):
    """A chat template failed, ran too long, or produced too much output; or the messages are invalid."""


class InputError(GemrunError):
    """A request is invalid: bad text, prompt past the context, bad sampling parameters."""


class ModelLost(GemrunError):
    """The model can no longer run (a tensor-parallel rank died): the engine stops, requests get 503."""
