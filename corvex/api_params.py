"""Every request parameter of the OpenAI API Corvex serves (and the vLLM extensions clients
send), with what Corvex does with it: the one definition behind docs/api.md, and what the edge's
validation refuses by name.

Statuses: `implemented` (served on every engine, end to end), `engines` (both engines serve it;
the edge and the wire carry it in phase 2 of issue 14), `refused` (a 400 whose `param` names
it), `ignored` (accepted with no effect, as vLLM does: it does not change the answer). It must
never import the core or the edge: both read it. `python -m corvex.api_params` prints the page.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Final


class Status(enum.Enum):
    IMPLEMENTED = "implemented"
    ENGINES = "engines"
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


IMPLEMENTED, ENGINES, REFUSED, IGNORED = (
    Status.IMPLEMENTED,
    Status.ENGINES,
    Status.REFUSED,
    Status.IGNORED,
)

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
        ENGINES,
        "at most 300 token ids of the model's vocabulary, -100 (ban) to 100 (force)",
    ),
    Param("n", ENGINES, "1 to 16 choices; prompt billed once, every choice's tokens billed"),
    Param("top_k", ENGINES, "vLLM extension", openai=False),
    Param("min_p", ENGINES, "vLLM extension", openai=False),
    Param("repetition_penalty", ENGINES, "vLLM extension", openai=False),
    Param("stop_token_ids", ENGINES, "at most 64 ids of the vocabulary", openai=False),
    Param("include_stop_str_in_output", ENGINES, "vLLM extension", openai=False),
    Param("ignore_eos", IMPLEMENTED, "vLLM extension", openai=False),
    Param("prompt_logprobs", ENGINES, "0 to 20 (vLLM extension)", openai=False),
    Param("min_tokens", REFUSED, "not served", openai=False),
    Param("use_beam_search", REFUSED, "not served", openai=False),
    Param("length_penalty", REFUSED, "beam search only", openai=False),
    Param("skip_special_tokens", REFUSED, "the model's default applies", openai=False),
    Param("spaces_between_special_tokens", REFUSED, "not served", openai=False),
    Param("truncate_prompt_tokens", REFUSED, "prompts are never cut", openai=False),
    Param("allowed_token_ids", REFUSED, "not served", openai=False),
    Param("bad_words", REFUSED, "not served", openai=False),
    Param("logprob_token_ids", REFUSED, "not served", openai=False),
    Param("structured_outputs", REFUSED, "use response_format", openai=False),
    Param("guided_json", REFUSED, "use response_format", openai=False),
    Param("guided_regex", REFUSED, "not served", openai=False),
    Param("guided_choice", REFUSED, "not served", openai=False),
    Param("guided_grammar", REFUSED, "not served", openai=False),
    Param("priority", REFUSED, "one priority for all", openai=False),
    Param("return_tokens_as_token_ids", REFUSED, "not served", openai=False),
    Param("return_token_ids", REFUSED, "not served", openai=False),
    Param("cache_salt", REFUSED, "not served", openai=False),
    Param("kv_transfer_params", REFUSED, "not served", openai=False),
    Param("vllm_xargs", REFUSED, "not served", openai=False),
    Param("request_id", IGNORED, "send the x-request-id header instead", openai=False),
)

_CHAT: Final = (
    Param("messages", IMPLEMENTED, "text content"),
    Param("model", IMPLEMENTED, "a catalogue model id"),
    Param("max_completion_tokens", IMPLEMENTED, "per choice; bounded by context and balance"),
    Param("max_tokens", IMPLEMENTED, "deprecated alias of max_completion_tokens"),
    Param(
        "stream_options",
        IMPLEMENTED,
        "include_usage; continuous_usage_stats (vLLM) is wired in phase 2",
    ),
    Param(
        "tools",
        ENGINES,
        "function tools, at most 128, parameters a JSON Schema; vLLM needs a tool_call_parser",
    ),
    Param("tool_choice", ENGINES, "none, auto, required or a named function"),
    Param("parallel_tool_calls", ENGINES, "whether one answer may hold several calls"),
    Param(
        "messages[].tool_calls / role tool",
        ENGINES,
        "assistant tool calls and tool results (tool_call_id) in the history",
    ),
    Param(
        "response_format",
        ENGINES,
        "text, json_object, json_schema (strict); an invalid schema is a 400",
    ),
    Param("logprobs", ENGINES, "the sampled token's logprob, per token"),
    Param("top_logprobs", ENGINES, "0 to 20; needs logprobs"),
    Param(
        "reasoning_effort",
        ENGINES,
        "none, minimal, low, medium, high, xhigh, max; the answer's `reasoning` field",
    ),
    Param(
        "chat_template_kwargs",
        ENGINES,
        "at most 32 template variables, e.g. enable_thinking",
        openai=False,
    ),
    Param("include_reasoning", ENGINES, "false drops reasoning, still billed", openai=False),
    Param("metadata", IGNORED, "stored completions are not served"),
    Param("store", REFUSED, "true is refused: completions are not stored"),
    Param("service_tier", IGNORED, "one tier"),
    Param("prompt_cache_key", IGNORED, "the prefix cache needs no key"),
    Param("safety_identifier", IGNORED, "an end-user id for abuse monitoring"),
    Param("modalities", REFUSED, 'anything but ["text"] is refused'),
    Param("audio", REFUSED, "no audio output"),
    Param("prediction", REFUSED, "predicted outputs are not served"),
    Param("web_search_options", REFUSED, "no web search"),
    Param("verbosity", REFUSED, "not served"),
    Param("functions", REFUSED, "deprecated: use tools"),
    Param("function_call", REFUSED, "deprecated: use tool_choice"),
    Param("echo", REFUSED, "chat echo (vLLM) is not served", openai=False),
    Param("add_generation_prompt", REFUSED, "the template's default applies", openai=False),
    Param("continue_final_message", REFUSED, "not served", openai=False),
    Param("documents", REFUSED, "not served", openai=False),
    Param("chat_template", REFUSED, "the model's own template only", openai=False),
    Param("thinking_token_budget", REFUSED, "not served", openai=False),
    *_SAMPLING,
)

_COMPLETIONS: Final = (
    Param("model", ENGINES, "a catalogue model id"),
    Param("prompt", ENGINES, "a string or token ids (one prompt); no chat template"),
    Param("max_tokens", ENGINES, "per choice; default 16 as OpenAI's"),
    Param("echo", ENGINES, "the prompt before the answer; with logprobs, the prompt's too"),
    Param(
        "logprobs",
        ENGINES,
        "0 to 20 (OpenAI: 5): tokens, token_logprobs, top_logprobs, text_offset",
    ),
    Param("stream_options", ENGINES, "include_usage; continuous_usage_stats (vLLM)"),
    Param("suffix", REFUSED, "insertion is not served"),
    Param("best_of", REFUSED, "not served"),
    Param("response_format", ENGINES, "as on chat (vLLM extension)", openai=False),
    *(
        Param(p.name, ENGINES if p.status is IMPLEMENTED else p.status, p.note, p.openai)
        for p in _SAMPLING
    ),
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


_STATUS_TEXT: Final = {
    Status.IMPLEMENTED: "implemented",
    Status.ENGINES: "implemented on both engines; wired end to end in phase 2",
    Status.REFUSED: "refused (400 naming the param)",
    Status.IGNORED: "accepted, no effect (as vLLM)",
}


def render() -> str:
    """docs/api.md."""
    lines = [
        "# The API's request parameters",
        "",
        "Generated from `corvex/api_params.py` by `python -m corvex.api_params > docs/api.md`;",
        "a test fails when they differ. Every parameter is implemented on every engine (the",
        "simulated engine and vLLM) or refused with a 400 whose `param` names it; a few that",
        'change nothing in an answer are accepted and ignored, as vLLM does. "Phase 2" marks',
        "what both engines serve and the edge and the gRPC API carry next (issue 14); until",
        "then the edge neither carries those nor refuses the ones marked refused.",
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
            lines.append(f"| `{p.name}` | {origin} | {_STATUS_TEXT[p.status]} | {p.note} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
