"""vllm/entrypoints/openai/chat_completion/protocol.py: ChatCompletionRequest with the fields,
defaults and the methods (build_chat_params, to_sampling_params, resolve_reasoning_ended) the
adapter uses, written as vLLM writes them; fields it does not use are left out."""

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm.exceptions import VLLMValidationError
from vllm.renderers import ChatParams, merge_kwargs
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionToolsParam(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(BaseModel):
    name: str


class ChatCompletionNamedToolChoiceParam(BaseModel):
    function: ChatCompletionNamedFunction
    type: Literal["function"] = "function"


class JsonSchemaResponseFormat(BaseModel):
    name: str
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


def structured_outputs_from_response_format(
    structured_outputs: StructuredOutputsParams | None, response_format: ResponseFormat | None
) -> StructuredOutputsParams | None:
    if response_format is None or response_format.type == "text":
        return structured_outputs
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    assert response_format.json_schema is not None
    return StructuredOutputsParams(json=response_format.json_schema.json_schema)


def check_prompt_logprobs(data: Any) -> Any:
    """The part of vLLM's `check_logprobs` (a `mode="before"` validator of both request
    types) that the adapter's fields can meet: its OpenAI server cannot stream them."""
    prompt_logprobs = data.get("prompt_logprobs") if isinstance(data, dict) else None
    asked = prompt_logprobs is not None and (prompt_logprobs > 0 or prompt_logprobs == -1)
    if asked and data.get("stream"):
        raise VLLMValidationError(
            "`prompt_logprobs` are not available when `stream=True`.", parameter="prompt_logprobs"
        )
    return data


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data: Any) -> Any:
        return check_prompt_logprobs(data)

    messages: list[dict[str, Any]]
    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = []
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: (
        Literal["none"]
        | Literal["auto"]
        | Literal["required"]
        | ChatCompletionNamedToolChoiceParam
        | None
    ) = "none"
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    parallel_tool_calls: bool | None = True
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    _DEFAULT_SAMPLING_PARAMS: ClassVar[dict[str, Any]] = {
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
    }

    def resolve_reasoning_ended(self, parser: Any, prompt_token_ids: list[int]) -> bool | None:
        if not self.include_reasoning:
            return True
        if parser is not None and parser.reasoning_parser is not None:
            return bool(parser.is_reasoning_end(prompt_token_ids))
        return None

    def build_chat_params(
        self,
        default_template: str | None,
        default_template_content_format: str,
        reasoning_effort_map: dict[str, str] | None = None,
    ) -> ChatParams:
        extra_kwargs: dict[str, Any] = dict(
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            reasoning_effort=self.reasoning_effort,
        )
        user_kwargs = self.chat_template_kwargs or {}
        if self.reasoning_effort is not None and "enable_thinking" not in user_kwargs:
            extra_kwargs["enable_thinking"] = self.reasoning_effort != "none"
        return ChatParams(
            chat_template=default_template,
            chat_template_content_format=default_template_content_format,
            chat_template_kwargs=merge_kwargs(self.chat_template_kwargs, extra_kwargs),
        )

    def to_sampling_params(
        self, max_tokens: int, default_sampling_params: dict[str, Any]
    ) -> SamplingParams:
        sampling_params = {
            name: (
                value
                if (value := getattr(self, name)) is not None
                else default_sampling_params.get(name, default)
            )
            for name, default in self._DEFAULT_SAMPLING_PARAMS.items()
        }
        skip_special_tokens = self.skip_special_tokens
        if skip_special_tokens is None:
            skip_special_tokens = default_sampling_params.get("skip_special_tokens", True)
        return SamplingParams.from_optional(
            n=self.n,
            **sampling_params,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            logprobs=self.top_logprobs if self.logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            skip_special_tokens=skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=(RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY),
            structured_outputs=structured_outputs_from_response_format(
                self.structured_outputs, self.response_format
            ),
            logit_bias=self.logit_bias,
        )
