"""vllm/v1/engine/exceptions.py."""

from vllm.exceptions import VLLMServerError


class EngineGenerateError(VLLMServerError):
    """Raised when a AsyncLLM.generate() fails. Recoverable."""


class EngineDeadError(VLLMServerError):
    """Raised when the EngineCore dies. Unrecoverable."""

    ENGINE_DEAD_MESSAGE = (
        "EngineCore encountered an issue. See stack trace (above) for the root cause."
    )
    CLIENT_MESSAGE = "The server had an error while processing your request."

    def __init__(self, *args: object, suppress_context: bool = False) -> None:
        super().__init__(self.ENGINE_DEAD_MESSAGE, *args)
        self.__suppress_context__ = suppress_context
