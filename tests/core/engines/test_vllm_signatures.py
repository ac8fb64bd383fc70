"""Every vLLM call the adapter makes, checked against the real vLLM.

Skipped where vLLM cannot be imported (`make test` on a machine without it); `make vllm-check`
installs vLLM in a venv of its own and runs this module. What the adapter uses is listed in
corvex_core/engines/vllm_contract.py, whose own check these tests run name by name, plus what
a signature cannot show (coroutines, exception nesting, vLLM accepting the arguments built).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any

import pytest

from corvex_core.config import VllmEngineConfig
from corvex_core.engines.base import (
    ChatContext,
    ResponseFormat,
    ResponseFormatType,
    SamplingOptions,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)
from corvex_core.engines.vllm import engine_args_kwargs, pooling_kwargs
from corvex_core.engines.vllm_contract import (
    VLLM_CALLS,
    VLLM_FIELDS,
    VLLM_MEMBERS,
    VLLM_OBJECTS,
    contract_problems,
    has_field,
)
from corvex_core.engines.vllm_requests import (
    chat_request_fields,
    completion_request_fields,
    sampling_params,
)


def import_quietly(name: str) -> Any:
    """Imports a vLLM module; warnings its dependencies raise while importing are theirs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (see make vllm-check)")

FAKES = Path(__file__).resolve().parents[2] / "fakes"


def resolve(target: str) -> Any:
    module_name, _, path = target.partition(":")
    obj: Any = import_quietly(module_name)
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def test_this_is_the_real_vllm() -> None:
    assert not getattr(vllm, "CORVEX_FAKE", False), "the fake vllm leaked into this test"
    assert FAKES not in Path(vllm.__file__).resolve().parents


@pytest.mark.parametrize("target", [*VLLM_OBJECTS.values(), *VLLM_MEMBERS])
def test_every_object_the_adapter_uses_exists(target: str) -> None:
    assert resolve(target) is not None


@pytest.mark.parametrize(("target", "names"), sorted(VLLM_CALLS.items()))
def test_every_call_takes_the_parameters_the_adapter_passes(
    target: str, names: tuple[str, ...]
) -> None:
    parameters = inspect.signature(resolve(target)).parameters
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    missing = [name for name in names if name not in parameters and not takes_any_keyword]
    assert missing == []


@pytest.mark.parametrize(("target", "names"), sorted(VLLM_FIELDS.items()))
def test_every_field_the_adapter_reads_or_fills_exists(target: str, names: tuple[str, ...]) -> None:
    cls = resolve(target)
    assert [name for name in names if not has_field(cls, name)] == []


def test_the_calls_are_awaited_iterated_or_called_as_the_adapter_does() -> None:
    llm_class = resolve("vllm.v1.engine.async_llm:AsyncLLM")
    assert inspect.isasyncgenfunction(llm_class.generate)
    assert inspect.isasyncgenfunction(llm_class.encode)
    assert inspect.iscoroutinefunction(llm_class.abort)
    assert inspect.iscoroutinefunction(llm_class.check_health)
    # Called on a worker thread, so they must not be coroutines.
    assert not inspect.iscoroutinefunction(llm_class.shutdown)
    assert not inspect.iscoroutinefunction(llm_class.get_tokenizer)
    assert not inspect.iscoroutinefunction(llm_class.from_vllm_config)


def test_the_exception_classes_nest_as_the_adapter_expects() -> None:
    # The adapter catches the narrower class of each pair first.
    exceptions = import_quietly("vllm.exceptions")
    assert issubclass(exceptions.VLLMValidationError, exceptions.VLLMClientError)
    assert issubclass(exceptions.RetryableRequestError, exceptions.GenerationError)
    engine_exceptions = import_quietly("vllm.v1.engine.exceptions")
    assert not issubclass(engine_exceptions.EngineDeadError, exceptions.VLLMClientError)


def test_vllm_accepts_the_arguments_the_adapter_builds() -> None:
    every_option = SamplingOptions(
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        stop=("x",),
        seed=1,
        ignore_eos=True,
        n=2,
        top_k=4,
        min_p=0.1,
        repetition_penalty=1.1,
        stop_token_ids=(7,),
        include_stop_str_in_output=True,
        logit_bias={5: -100.0},
        logprobs=3,
        prompt_logprobs=1,
        response_format=ResponseFormat(
            type=ResponseFormatType.JSON_SCHEMA, schema={"type": "object"}, name="x", strict=True
        ),
    )
    tool = Tool(name="f", parameters={"type": "object", "properties": {}})
    context = ChatContext(
        tools=(tool,),
        tool_choice=ToolChoice(mode=ToolChoiceMode.NAMED, name="f"),
        reasoning_effort="low",
        template_kwargs={"enable_thinking": True},
    )
    messages = [{"role": "user", "content": "hi"}]
    chat = resolve("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest")(
        **chat_request_fields(messages, context, every_option)
    )
    params = chat.to_sampling_params(5, {})
    delta = resolve("vllm.sampling_params:RequestOutputKind.DELTA")
    assert (params.max_tokens, params.stop, params.output_kind) == (5, ["x"], delta)
    assert (params.n, params.logprobs, params.logit_bias) == (2, 3, {5: -100.0})
    assert params.structured_outputs.json == {"type": "object"}
    completion = resolve("vllm.entrypoints.openai.completion.protocol:CompletionRequest")(
        **completion_request_fields([1, 2], every_option)
    )
    assert sampling_params(completion, every_option, {}).prompt_logprobs == 1
    assert sampling_params(chat, every_option, {}).output_kind == delta
    pooling = resolve("vllm.pooling_params:PoolingParams")(**pooling_kwargs(4))
    assert pooling.dimensions == 4
    config = VllmEngineConfig(
        model="/weights/m",
        quantization="fp8",
        distributed_executor_backend="ray",
        enable_prefix_caching=True,
        max_num_seqs=8,
        engine_args={"trust_remote_code": True},
    )
    args_class = resolve("vllm.engine.arg_utils:AsyncEngineArgs")
    args = args_class(**engine_args_kwargs("acme/m", config, context_length=4096))
    assert (args.max_model_len, args.served_model_name) == (4096, "acme/m")
    assert args.enable_log_requests is False


def test_the_contract_check_finds_no_problem() -> None:
    assert contract_problems() == []
