"""vllm/entrypoints/openai/chat_completion/stream_processor.py: one choice's chunks turned into
stream deltas and its chat finish_reason, as vLLM's chat server streams them."""

from typing import Any, NamedTuple

from vllm.entrypoints.generate.base.protocol import DeltaMessage


class ChatStreamStep(NamedTuple):
    delta: DeltaMessage | None
    finish_reason: str | None


class ChatStreamProcessor:
    def __init__(
        self, request: Any, parser: Any, *, enable_auto_tools: bool, parser_cls: Any
    ) -> None:
        self.request = request
        self.parser = parser
        self.keep_tool_calls = request.tool_choice != "none" and (
            enable_auto_tools
            or request.tool_choice == "required"
            or not isinstance(request.tool_choice, str)
        )
        self.num_output_tokens = 0
        self.tools_streamed = False
        self.hide_metadata = parser is not None and not request.include_reasoning

    def step(
        self,
        delta_text: str,
        delta_token_ids: list[int],
        finish_reason: str | None,
        prompt_token_ids: list[int] | None,
    ) -> ChatStreamStep:
        delta: DeltaMessage | None
        if not delta_text and not delta_token_ids and not self.num_output_tokens:
            delta = DeltaMessage()
        elif self.parser is not None:
            delta = self.parser.parse_delta(
                delta_text=delta_text,
                delta_token_ids=delta_token_ids,
                request=self.request,
                prompt_token_ids=prompt_token_ids,
                finished=finish_reason is not None,
            )
            if delta is not None and delta.tool_calls:
                if self.keep_tool_calls:
                    self.tools_streamed = True
                else:
                    delta.tool_calls = []
        else:
            delta = DeltaMessage(content=delta_text)
        if delta is not None and not self.request.include_reasoning:
            delta.reasoning = None
        self.num_output_tokens += len(delta_token_ids)
        if finish_reason is not None:
            named = not isinstance(self.request.tool_choice, str)
            if self.tools_streamed and finish_reason == "stop" and not named:
                finish_reason = "tool_calls"
        return ChatStreamStep(delta, finish_reason)
