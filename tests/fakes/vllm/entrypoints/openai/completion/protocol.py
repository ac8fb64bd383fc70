"""vllm/entrypoints/openai/completion/protocol.py: CompletionRequest with the fields and the
to_sampling_params the adapter uses, written as vLLM writes them."""

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from vllm.entrypoints.openai.chat_completion.protocol import (
    ResponseFormat,
    check_prompt_logprobs,
    structured_outputs_from_response_format,
)
from vllm.sampling_params import RequestOutputKind, SamplingParams


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data: Any) -> Any:
        return check_prompt_logprobs(data)

    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str] | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = []
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    _DEFAULT_SAMPLING_PARAMS: ClassVar[dict[str, Any]] = {
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
    }

    def to_sampling_params(
        self, max_tokens: int, default_sampling_params: dict[str, Any] | None = None
    ) -> SamplingParams:
        default_sampling_params = default_sampling_params or {}
        sampling_params = {
            name: (
                value
                if (value := getattr(self, name)) is not None
                else default_sampling_params.get(name, default)
            )
            for name, default in self._DEFAULT_SAMPLING_PARAMS.items()
        }
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        skip_special_tokens = self.skip_special_tokens
        if skip_special_tokens is None:
            skip_special_tokens = default_sampling_params.get("skip_special_tokens", True)
        return SamplingParams.from_optional(
            n=self.n,
            **sampling_params,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            logprobs=self.logprobs,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=(RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY),
            structured_outputs=structured_outputs_from_response_format(None, self.response_format),
            logit_bias=self.logit_bias,
        )
