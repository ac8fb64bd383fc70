"""vllm/logprobs.py: one candidate's logprob, as CompletionOutput.logprobs holds them."""

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
