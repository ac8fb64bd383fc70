"""What a benchmark asks for: models (a weighted mix), prompt and output lengths (fixed or
sampled), streaming or not, and which API keys to spread requests over. It turns that into a
deterministic stream of `RequestSpec`s; it knows nothing of wire formats or timing."""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator

import msgspec

DEFAULT_MODEL = "deepseek-ai/DeepSeek-V4-Flash"
# Words of the prompts. The simulated tokenizer counts each word as one token.
_WORDS = ("benchmark", "tokens", "stream", "latency", "metered", "request", "gateway", "core")


class Lengths(msgspec.Struct, frozen=True):
    """A token count: fixed when low == high, else drawn uniformly from [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """ "64" (fixed) or "32-128" (uniform)."""
        low, _, high = text.partition("-")
        lengths = cls(int(low), int(high or low))
        if not 1 <= lengths.low <= lengths.high:
            raise ValueError(f"lengths must be 1 <= low <= high, not {text!r}")
        return lengths

    @classmethod
    def fixed(cls, value: int) -> Lengths:
        return cls(value, value)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


class Workload(msgspec.Struct, frozen=True):
    """The requests of a run. `ignore_eos` makes every answer exactly max_tokens long."""

    models: tuple[tuple[str, float], ...] = ((DEFAULT_MODEL, 1.0),)
    prompt_tokens: Lengths = Lengths.fixed(64)
    max_tokens: Lengths = Lengths.fixed(16)
    stream: bool = False
    ignore_eos: bool = True
    api_keys: tuple[str, ...] = ()
    seed: int = 0

    def describe(self) -> str:
        mode = "stream" if self.stream else "non-stream"
        return f"{mode}, prompt {self.prompt_tokens} words, max_tokens {self.max_tokens}"


class RequestSpec(msgspec.Struct, frozen=True):
    """One request to send."""

    model: str
    prompt: str
    max_tokens: int
    stream: bool
    ignore_eos: bool
    api_key: str | None


@functools.lru_cache(maxsize=4096)
def prompt_text(words: int) -> str:
    """A prompt of `words` words; the same text for the same length."""
    return " ".join(itertools.islice(itertools.cycle(_WORDS), words))


def parse_model_mix(items: list[str]) -> tuple[tuple[str, float], ...]:
    """["a=3", "b"] → (("a", 3.0), ("b", 1.0))."""
    mix = []
    for item in items:
        name, _, weight = item.partition("=")
        mix.append((name, float(weight or 1)))
    return tuple(mix)


def requests(workload: Workload) -> Iterator[RequestSpec]:
    """An endless, deterministic stream of requests; keys are used in turn."""
    rng = random.Random(workload.seed)
    names = [name for name, _ in workload.models]
    weights = [weight for _, weight in workload.models]
    keys: Iterator[str | None] = (
        itertools.cycle(workload.api_keys) if workload.api_keys else itertools.repeat(None)
    )
    while True:
        model = names[0] if len(names) == 1 else rng.choices(names, weights)[0]
        yield RequestSpec(
            model=model,
            prompt=prompt_text(workload.prompt_tokens.draw(rng)),
            max_tokens=workload.max_tokens.draw(rng),
            stream=workload.stream,
            ignore_eos=workload.ignore_eos,
            api_key=next(keys),
        )
