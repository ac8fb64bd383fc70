"""The contract between the vLLM adapter and vLLM: every name, parameter and field it uses.

`engines/vllm.py` touches vLLM only through the names listed here, and this module checks them
by introspection against whatever `vllm` is importable: `make vllm-check` runs the check against
the real release in a venv of its own (`python -m corvex_core.engines.vllm_contract`, then
tests/core/engines/test_vllm_signatures.py), and the adapter's tests run it against the fake of
tests/fakes. Production start-up never runs it: an engine start compares only the version
(`version_warning`), because introspection (and reading source) belongs to a check, not to every
start of a GPU node.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

# The vLLM release the adapter was written against, read from its wheel (see vllm.py).
VLLM_VERSION_READ: Final = "0.33.0"

# The vLLM objects the adapter uses, by "module:attribute.path".
VLLM_OBJECTS: Final[Mapping[str, str]] = {
    "AsyncEngineArgs": "vllm.engine.arg_utils:AsyncEngineArgs",
    "AsyncLLM": "vllm.v1.engine.async_llm:AsyncLLM",
    "UsageContext": "vllm.usage.usage_lib:UsageContext",
    "PoolingParams": "vllm.pooling_params:PoolingParams",
    "TokensPrompt": "vllm.inputs:TokensPrompt",
    "TextPrompt": "vllm.inputs:TextPrompt",
    "ChatCompletionRequest": "vllm.entrypoints.openai.chat_completion.protocol:"
    "ChatCompletionRequest",
    "CompletionRequest": "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
    "ParserManager": "vllm.parser:ParserManager",
    "ChatStreamProcessor": "vllm.entrypoints.openai.chat_completion.stream_processor:"
    "ChatStreamProcessor",
    "EngineDeadError": "vllm.v1.engine.exceptions:EngineDeadError",
    "EngineGenerateError": "vllm.v1.engine.exceptions:EngineGenerateError",
    "VLLMValidationError": "vllm.exceptions:VLLMValidationError",
    "VLLMClientError": "vllm.exceptions:VLLMClientError",
    "GenerationError": "vllm.exceptions:GenerationError",
    "RetryableRequestError": "vllm.exceptions:RetryableRequestError",
    "GracefulHTTPError": "vllm.exceptions:GracefulHTTPError",
}

# The AsyncEngineArgs fields that VllmEngineConfig's own fields map to (engine_args_kwargs).
ENGINE_ARG_NAMES: Final = (
    "model",
    "served_model_name",
    "tokenizer",
    "dtype",
    "quantization",
    "max_model_len",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "distributed_executor_backend",
    "enable_prefix_caching",
    "max_num_seqs",
    "runner",
    # So that the engine's structured outputs start after the model's reasoning.
    "reasoning_parser",
    "enable_log_requests",
    "disable_log_stats",
)

# The fields of vLLM's OpenAI request objects that the adapter fills in (request_fields and
# chat_request_fields in vllm.py). vLLM's own `to_sampling_params` turns them into
# SamplingParams, exactly as `vllm serve` does.
REQUEST_FIELD_NAMES: Final = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "logit_bias",
    "response_format",
    "stream",
)
CHAT_REQUEST_FIELD_NAMES: Final = (
    *REQUEST_FIELD_NAMES,
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "chat_template_kwargs",
    "include_reasoning",
    "logprobs",
    "top_logprobs",
)
COMPLETION_REQUEST_FIELD_NAMES: Final = (*REQUEST_FIELD_NAMES, "prompt", "echo", "logprobs")

POOLING_PARAM_NAMES: Final = ("task", "dimensions", "use_activation")

# Callables and the keyword parameters the adapter passes to them. A class stands for its
# constructor.
VLLM_CALLS: Final[Mapping[str, tuple[str, ...]]] = {
    "vllm.engine.arg_utils:AsyncEngineArgs": ENGINE_ARG_NAMES,
    "vllm.engine.arg_utils:AsyncEngineArgs.create_engine_config": ("usage_context",),
    "vllm.v1.engine.async_llm:AsyncLLM.from_vllm_config": (
        "vllm_config",
        "usage_context",
        "enable_log_requests",
        "disable_log_stats",
    ),
    "vllm.v1.engine.async_llm:AsyncLLM.generate": (
        "prompt",
        "sampling_params",
        "request_id",
        "reasoning_ended",
    ),
    "vllm.v1.engine.async_llm:AsyncLLM.encode": ("prompt", "pooling_params", "request_id"),
    "vllm.v1.engine.async_llm:AsyncLLM.abort": ("request_id",),
    "vllm.v1.engine.async_llm:AsyncLLM.check_health": (),
    "vllm.v1.engine.async_llm:AsyncLLM.get_tokenizer": (),
    "vllm.v1.engine.async_llm:AsyncLLM.shutdown": (),
    "vllm.config:ModelConfig.get_diff_sampling_param": (),
    "vllm.config:ModelConfig.get_vocab_size": (),
    "vllm.pooling_params:PoolingParams": POOLING_PARAM_NAMES,
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest": (
        CHAT_REQUEST_FIELD_NAMES
    ),
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.to_sampling_params": (
        "max_tokens",
        "default_sampling_params",
    ),
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.build_chat_params": (
        "default_template",
        "default_template_content_format",
    ),
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest"
    ".resolve_reasoning_ended": ("parser", "prompt_token_ids"),
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest": (
        COMPLETION_REQUEST_FIELD_NAMES
    ),
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest.to_sampling_params": (
        "max_tokens",
        "default_sampling_params",
    ),
    "vllm.parser:ParserManager.get_parser": (
        "tool_parser_name",
        "reasoning_parser_name",
        "enable_auto_tools",
        "model_name",
        "tokenizer",
    ),
    "vllm.parser.abstract_parser:Parser": ("tokenizer", "tools", "model_config"),
    "vllm.parser.abstract_parser:Parser.adjust_request": ("request",),
    "vllm.parser.abstract_parser:Parser.set_prompt_token_ids": ("prompt_token_ids",),
    "vllm.parser.abstract_parser:Parser.parse_delta": (
        "delta_text",
        "delta_token_ids",
        "request",
        "prompt_token_ids",
        "finished",
    ),
    "vllm.parser.abstract_parser:Parser.count_reasoning_tokens": ("token_ids",),
    "vllm.entrypoints.openai.chat_completion.stream_processor:ChatStreamProcessor": (
        "request",
        "parser",
        "enable_auto_tools",
        "parser_cls",
    ),
    "vllm.entrypoints.openai.chat_completion.stream_processor:ChatStreamProcessor.step": (
        "delta_text",
        "delta_token_ids",
        "finish_reason",
        "prompt_token_ids",
    ),
    "vllm.renderers:ChatParams.with_defaults": ("default_chat_template_kwargs",),
    "vllm.tokenizers:TokenizerLike.apply_chat_template": (
        "messages",
        "tools",
        "tokenize",
        "add_generation_prompt",
    ),
    "vllm.tokenizers:TokenizerLike.encode": ("text", "add_special_tokens"),
    "vllm.tokenizers:TokenizerLike.decode": ("ids",),
    "vllm.outputs:RequestError.to_exception": (),
}

# Fields and attributes the adapter reads or fills in (TypedDict keys for the prompts).
VLLM_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "vllm.inputs:TokensPrompt": ("prompt_token_ids",),
    "vllm.inputs:TextPrompt": ("prompt",),
    "vllm.v1.engine.async_llm:AsyncLLM": ("model_config",),
    "vllm.config:ModelConfig": ("max_model_len", "max_logprobs"),
    # Set after to_sampling_params (vllm_requests.sampling_params).
    "vllm.sampling_params:SamplingParams": ("prompt_logprobs",),
    "vllm.outputs:RequestOutput": (
        "prompt_token_ids",
        "prompt_logprobs",
        "outputs",
        "finished",
        "num_cached_tokens",
    ),
    "vllm.outputs:CompletionOutput": (
        "index",
        "text",
        "token_ids",
        "logprobs",
        "finish_reason",
        "stop_reason",
    ),
    "vllm.logprobs:Logprob": ("logprob", "rank", "decoded_token"),
    "vllm.outputs:PoolingRequestOutput": ("prompt_token_ids", "outputs", "error"),
    "vllm.outputs:PoolingOutput": ("data",),
    "vllm.exceptions:VLLMValidationError": ("parameter",),
    "vllm.exceptions:GracefulHTTPError": ("http_status",),
    "vllm.entrypoints.generate.base.protocol:DeltaMessage": ("content", "reasoning", "tool_calls"),
    "vllm.entrypoints.generate.base.protocol:DeltaToolCall": ("index", "id", "function"),
    "vllm.entrypoints.generate.base.protocol:DeltaFunctionCall": ("name", "arguments"),
    "vllm.renderers:ChatParams": ("chat_template_kwargs",),
    "vllm.parser.abstract_parser:Parser": (
        "tool_parser_cls",
        "reasoning_parser_cls",
        "always_adjust_request",
    ),
    "vllm.entrypoints.openai.chat_completion.stream_processor:ChatStreamProcessor": (
        "parser",
        "hide_metadata",
    ),
    "vllm.entrypoints.openai.chat_completion.stream_processor:ChatStreamStep": (
        "delta",
        "finish_reason",
    ),
}

# Enum members the adapter uses.
VLLM_MEMBERS: Final = ("vllm.usage.usage_lib:UsageContext.OPENAI_API_SERVER",)

# Tool-call and reasoning parser names the catalogue's models are configured with; each must be
# registered in the release (ToolParserManager / ReasoningParserManager).
TOOL_CALL_PARSERS: Final = ("hermes", "glm47", "kimi_k2", "minimax_m2", "deepseek_v4")
REASONING_PARSERS: Final = ("qwen3", "glm45", "kimi_k2", "minimax_m2", "deepseek_v4")
REGISTRIES: Final[Mapping[str, tuple[str, ...]]] = {
    "vllm.tool_parsers:ToolParserManager": TOOL_CALL_PARSERS,
    "vllm.reasoning:ReasoningParserManager": REASONING_PARSERS,
}


def resolve(target: str) -> Any:
    """The object at "module:attribute.path"."""
    module_name, _, path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def version_warning(version: str) -> str | None:
    """A sentence for the log when the installed vLLM is not the minor release read."""
    read = VLLM_VERSION_READ.split(".")[:2]
    if version.split("+")[0].split(".")[:2] == read:
        return None
    return (
        f"vLLM {version} is installed but the adapter was written against "
        f"{VLLM_VERSION_READ}: run `make vllm-check` against it"
    )


def _lookup(target: str, problems: list[str]) -> Any:
    try:
        return resolve(target)
    except (ImportError, AttributeError) as exc:
        problems.append(f"{target} cannot be found: {exc}")
        return None


def _parameters(obj: Any) -> Mapping[str, inspect.Parameter]:
    model_fields = getattr(obj, "model_fields", None)
    if isinstance(obj, type) and isinstance(model_fields, dict):
        # A pydantic model: its constructor takes its fields (inspect sees `**data`).
        return {
            name: inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in model_fields
        }
    return inspect.signature(obj).parameters


def _missing_parameters(target: str, names: Sequence[str], problems: list[str]) -> None:
    obj = _lookup(target, problems)
    if obj is None:
        return
    parameters = _parameters(obj)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    problems.extend(f"{target} takes no parameter {n!r}" for n in names if n not in parameters)


def has_field(cls: Any, name: str) -> bool:
    """Whether instances of `cls` have the attribute `name` (TypedDict keys included)."""
    if hasattr(cls, "__required_keys__"):  # a TypedDict
        return name in cls.__required_keys__ | cls.__optional_keys__
    if dataclasses.is_dataclass(cls):
        return name in {field.name for field in dataclasses.fields(cls)}
    if name in getattr(cls, "__struct_fields__", ()) or hasattr(cls, name):
        return True
    if name in (getattr(cls, "model_fields", None) or {}):  # a pydantic model
        return True
    # A plain class sets its attributes in __init__.
    try:
        return f"self.{name} =" in inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return False


def _missing_fields(target: str, names: Sequence[str], problems: list[str]) -> None:
    cls = _lookup(target, problems)
    if cls is not None:
        problems.extend(f"{target} has no field {n!r}" for n in names if not has_field(cls, n))


def _unregistered(target: str, names: Sequence[str], problems: list[str]) -> None:
    manager = _lookup(target, problems)
    if manager is None:
        return
    registered = set(manager.list_registered())
    problems.extend(f"{target} has no parser {n!r}" for n in names if n not in registered)


def contract_problems() -> list[str]:
    """What the importable vllm lacks of what the adapter uses; empty when all of it is there."""
    problems: list[str] = []
    for target in (*VLLM_OBJECTS.values(), *VLLM_MEMBERS):
        _lookup(target, problems)
    for target, names in VLLM_CALLS.items():
        _missing_parameters(target, names, problems)
    for target, names in VLLM_FIELDS.items():
        _missing_fields(target, names, problems)
    for target, names in REGISTRIES.items():
        _unregistered(target, names, problems)
    return problems


def main() -> int:
    """`python -m corvex_core.engines.vllm_contract`: prints the problems, fails if any."""
    version = str(getattr(importlib.import_module("vllm"), "__version__", "unknown"))
    problems = contract_problems()
    for problem in problems:
        print(f"vllm-check: {problem}", file=sys.stderr)
    print(f"vllm-check: vllm {version}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
