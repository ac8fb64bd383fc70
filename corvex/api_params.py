"""Every request parameter of the OpenAI API Corvex serves (and the vLLM extensions clients
send), with what Corvex does with it: the one definition behind docs/api.md, and what the edge's
validation refuses by name.

Statuses: `implemented` (served on every engine, end to end), `refused` (a 400 whose `param`
names it; a refused parameter sent with its default, `accepts`, changes nothing and passes),
`ignored` (accepted with no effect, as vLLM does: it does not change the answer). It must never
import the core or the edge: both read it. `python -m corvex.api_params` prints the page.
"""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import dataclass
from typing import Final


class Status(enum.Enum):
    IMPLEMENTED = "implemented"
    REFUSED = "refused"
    IGNORED = "ignored"


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"


@dataclass(frozen=True)
class Param:
    name: str
    status: Status
    note: str
    # OpenAI's own parameter (False: a vLLM extension).
    openai: bool = True
    # For a refused parameter: the values that mean "not asked for" (its default), which a
    # client may send as they change nothing. JSON null always passes.
    accepts: tuple[object, ...] = ()


IMPLEMENTED, REFUSED, IGNORED = Status.IMPLEMENTED, Status.REFUSED, Status.IGNORED

# Parameters both generating endpoints share, by name.
_SAMPLING: Final = (
    Param("frequency_penalty", IMPLEMENTED, "-2 to 2"),
    Param("presence_penalty", IMPLEMENTED, "-2 to 2"),
    Param("temperature", IMPLEMENTED, "0 to 2; 0 is greedy"),
    Param("top_p", IMPLEMENTED, "(0, 1]"),
    Param("seed", IMPLEMENTED, "choice i of n samples with seed + i, as vLLM"),
    Param("stop", IMPLEMENTED, "up to 4 strings; never streamed"),
    Param("stream", IMPLEMENTED, "server-sent events framed as OpenAI's"),
    Param("user", IGNORED, "an end-user id for abuse monitoring; vLLM ignores it too"),
    Param(
        "logit_bias",
        IMPLEMENTED,
        "at most 300 token ids of the model's vocabulary, -100 (ban) to 100 (force)",
    ),
    Param(
        "n",
        IMPLEMENTED,
        "1 to 16 choices, streamed interleaved; the prompt billed once, every choice's tokens",
    ),
    Param("top_k", IMPLEMENTED, "-1 (all) or at least 1", openai=False),
    Param("min_p", IMPLEMENTED, "0 to 1", openai=False),
    Param("repetition_penalty", IMPLEMENTED, "greater than 0; 1 is none", openai=False),
    Param("stop_token_ids", IMPLEMENTED, "at most 64 ids of the vocabulary", openai=False),
    Param("include_stop_str_in_output", IMPLEMENTED, "keeps the stop string", openai=False),
    Param("ignore_eos", IMPLEMENTED, "generate to max_tokens; needs max_tokens", openai=False),
    Param(
        "prompt_logprobs",
        IMPLEMENTED,
        "0 to 20, in vLLM's shape; not with stream (as vLLM)",
        openai=False,
    ),
    Param("min_tokens", REFUSED, "not served", openai=False, accepts=(0,)),
    Param("use_beam_search", REFUSED, "not served", openai=False, accepts=(False,)),
    Param("length_penalty", REFUSED, "beam search only", openai=False, accepts=(1,)),
    Param(
        "skip_special_tokens",
        REFUSED,
        "the model's default applies",
        openai=False,
        accepts=(True,),
    ),
    Param("spaces_between_special_tokens", REFUSED, "not served", openai=False, accepts=(True,)),
    Param("truncate_prompt_tokens", REFUSED, "prompts are never cut", openai=False),
    Param("allowed_token_ids", REFUSED, "not served", openai=False),
    Param("bad_words", REFUSED, "not served", openai=False, accepts=([],)),
    Param("logprob_token_ids", REFUSED, "not served", openai=False),
    Param("structured_outputs", REFUSED, "use response_format", openai=False),
    Param("guided_json", REFUSED, "use response_format", openai=False),
    Param("guided_regex", REFUSED, "not served", openai=False),
    Param("guided_choice", REFUSED, "not served", openai=False),
    Param("guided_grammar", REFUSED, "not served", openai=False),
    Param("priority", REFUSED, "one priority for all", openai=False, accepts=(0,)),
    Param("return_tokens_as_token_ids", REFUSED, "not served", openai=False, accepts=(False,)),
    Param("return_token_ids", REFUSED, "not served", openai=False, accepts=(False,)),
    Param("cache_salt", REFUSED, "not served", openai=False),
    Param("kv_transfer_params", REFUSED, "not served", openai=False),
    Param("vllm_xargs", REFUSED, "not served", openai=False),
    Param("request_id", IGNORED, "send the x-request-id header instead", openai=False),
)

_CHAT: Final = (
    Param(
        "messages",
        IMPLEMENTED,
        "system, developer, user, assistant and tool messages; text content (parts of type text)",
    ),
    Param("model", IMPLEMENTED, "a catalogue model id"),
    Param("max_completion_tokens", IMPLEMENTED, "per choice; bounded by context and balance"),
    Param("max_tokens", IMPLEMENTED, "deprecated alias of max_completion_tokens"),
    Param(
        "stream_options",
        IMPLEMENTED,
        "include_usage; continuous_usage_stats (vLLM, needs include_usage): every chunk's "
        "usage counts the prompt and its choice's tokens so far, the cost comes at the end",
    ),
    Param(
        "tools",
        IMPLEMENTED,
        "function tools, at most 128, parameters a JSON Schema; vLLM needs a tool_call_parser",
    ),
    Param("tool_choice", IMPLEMENTED, "none, auto, required or a named function"),
    Param("parallel_tool_calls", IMPLEMENTED, "whether one answer may hold several calls"),
    Param(
        "messages[].name",
        IMPLEMENTED,
        "a participant's name, given to the chat template (the simulated one writes it)",
    ),
    Param(
        "messages[].tool_calls / role tool",
        IMPLEMENTED,
        "assistant tool calls and tool results (tool_call_id) in the history",
    ),
    Param(
        "response_format",
        IMPLEMENTED,
        "text, json_object, json_schema (strict); an invalid schema is a 400",
    ),
    Param("logprobs", IMPLEMENTED, "the sampled token's logprob, per token, streamed too"),
    Param("top_logprobs", IMPLEMENTED, "0 to 20; needs logprobs"),
    Param(
        "reasoning_effort",
        IMPLEMENTED,
        "none, minimal, low, medium, high, xhigh, max; the answer's `reasoning` field (vLLM's)",
    ),
    Param(
        "chat_template_kwargs",
        IMPLEMENTED,
        "at most 32 template variables, e.g. enable_thinking",
        openai=False,
    ),
    Param("include_reasoning", IMPLEMENTED, "false drops reasoning, still billed", openai=False),
    Param("metadata", IGNORED, "stored completions are not served"),
    Param("store", REFUSED, "completions are not stored", accepts=(False,)),
    Param("service_tier", IGNORED, "one tier"),
    Param("prompt_cache_key", IGNORED, "the prefix cache needs no key"),
    Param("safety_identifier", IGNORED, "an end-user id for abuse monitoring"),
    Param("modalities", REFUSED, "text only", accepts=(["text"],)),
    Param("audio", REFUSED, "no audio output"),
    Param("prediction", REFUSED, "predicted outputs are not served"),
    Param("web_search_options", REFUSED, "no web search"),
    Param("verbosity", REFUSED, "not served"),
    Param("functions", REFUSED, "deprecated: use tools"),
    Param("function_call", REFUSED, "deprecated: use tool_choice"),
    Param("echo", REFUSED, "chat echo (vLLM) is not served", openai=False, accepts=(False,)),
    Param(
        "add_generation_prompt",
        REFUSED,
        "the template's default applies",
        openai=False,
        accepts=(True,),
    ),
    Param("continue_final_message", REFUSED, "not served", openai=False, accepts=(False,)),
    Param("documents", REFUSED, "not served", openai=False),
    Param("chat_template", REFUSED, "the model's own template only", openai=False),
    Param("thinking_token_budget", REFUSED, "not served", openai=False),
    *_SAMPLING,
)

_COMPLETIONS: Final = (
    Param("model", IMPLEMENTED, "a catalogue model id"),
    Param(
        "prompt",
        IMPLEMENTED,
        "a string or token ids, or a list of one of them; a batch of several prompts is refused",
    ),
    Param("max_tokens", IMPLEMENTED, "per choice; default 16 as OpenAI's, null: as allowed"),
    Param("echo", IMPLEMENTED, "the prompt before the answer; with logprobs, the prompt's too"),
    Param(
        "logprobs",
        IMPLEMENTED,
        "0 to 20 (OpenAI: 5): tokens, token_logprobs, top_logprobs, text_offset",
    ),
    Param(
        "stream_options",
        IMPLEMENTED,
        "include_usage; continuous_usage_stats (vLLM), as on chat",
    ),
    Param("suffix", REFUSED, "insertion is not served"),
    Param("best_of", REFUSED, "not served", accepts=(1,)),
    Param("response_format", IMPLEMENTED, "as on chat (vLLM extension)", openai=False),
    *_SAMPLING,
)

_EMBEDDINGS: Final = (
    Param("input", IMPLEMENTED, "strings or token ids"),
    Param("model", IMPLEMENTED, "a catalogue model id"),
    Param("dimensions", IMPLEMENTED, "at most the model's width; vectors stay unit length"),
    Param("encoding_format", IMPLEMENTED, "float or base64"),
    Param("user", IGNORED, "an end-user id for abuse monitoring"),
    Param("truncate_prompt_tokens", REFUSED, "inputs are never cut", openai=False),
)

PARAMETERS: Final[dict[Endpoint, tuple[Param, ...]]] = {
    Endpoint.CHAT: _CHAT,
    Endpoint.COMPLETIONS: _COMPLETIONS,
    Endpoint.EMBEDDINGS: _EMBEDDINGS,
}


def refused(endpoint: Endpoint) -> frozenset[str]:
    """The parameters of an endpoint that a request may not carry (400 naming the param)."""
    return frozenset(p.name for p in PARAMETERS[endpoint] if p.status is Status.REFUSED)


def param(endpoint: Endpoint, name: str) -> Param:
    """The row of one parameter of an endpoint."""
    return next(p for p in PARAMETERS[endpoint] if p.name == name)


def is_default(p: Param, value: object) -> bool:
    """Whether `value` of a refused parameter asks for nothing: null or one it `accepts`.
    true is not 1 here, as in JSON."""
    return value is None or any(
        (type(value) is bool) == (type(a) is bool) and value == a for a in p.accepts
    )


_STATUS_TEXT: Final = {
    Status.IMPLEMENTED: "implemented",
    Status.REFUSED: "refused (400 naming the param)",
    Status.IGNORED: "accepted, no effect (as vLLM)",
}


def _note(p: Param) -> str:
    if not p.accepts:
        return p.note
    values = " or ".join(f"`{json.dumps(a)}`" for a in p.accepts)
    return f"{p.note}; {values} (the default) is accepted"


def render() -> str:
    """docs/api.md."""
    lines = [
        "# The API's request parameters",
        "",
        "Generated from `corvex/api_params.py` by `python -m corvex.api_params > docs/api.md`;",
        "a test fails when they differ. Every parameter is implemented on every engine (the",
        "simulated engine and vLLM) or refused with a 400 whose `param` names it; a few that",
        "change nothing in an answer are accepted and ignored, as vLLM does, and so are fields",
        "that no OpenAI or vLLM client sends. A refused parameter sent as null, or with the",
        "value that asks for nothing (its default), passes.",
        "",
        "Limits on the simulated engine: JSON for `response_format` and tool arguments is",
        "generated for the JSON Schema subset of OpenAI's strict mode (`pattern` and `not` are",
        "refused with a 400); `logit_bias` shapes free text, while JSON and tool-call tokens",
        "follow the schema, as a grammar forces them on a real engine.",
        "",
    ]
    for endpoint, params in PARAMETERS.items():
        lines += [
            f"## `{endpoint.value}`",
            "",
            "| parameter | from | status | notes |",
            "|---|---|---|---|",
        ]
        for p in params:
            origin = "OpenAI" if p.openai else "vLLM"
            lines.append(f"| `{p.name}` | {origin} | {_STATUS_TEXT[p.status]} | {_note(p)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
