"""Fake-only: what a real checkpoint and GPU node would provide, reduced to a toy.

No vLLM module has this name. It holds a word-level tokenizer with a chat template in the
style of real ones, the toy model's choice of words and embeddings, and the node the fake
platform reports. Everything else in this package mirrors vLLM.
"""

import json
import math
import random
from typing import Any

# What the fake platform reports as current_platform.device_count() with no
# CUDA_VISIBLE_DEVICES set.
GPUS_PER_NODE = 8
# The fake checkpoint's config.json: its context length and embedding width.
NATIVE_MAX_MODEL_LEN = 262_144
EMBEDDING_SIZE = 8
# The fake checkpoint's generation_config.json (sampling defaults); empty like many models.
CHECKPOINT_GENERATION_CONFIG: dict[str, Any] = {}
# Prefix caching hashes prompts in blocks of this many tokens.
BLOCK_SIZE = 16
# The fake model's vocabulary: token ids outside [0, VOCAB_SIZE) are refused.
VOCAB_SIZE = 32_000

WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
)  # fmt: skip

# Every fake AsyncLLM built in this process, newest last, so a test can reach the one its
# adapter built.
ENGINES: list[Any] = []


class TemplateError(Exception):
    """Stands for jinja2.exceptions.TemplateError, raised by a chat template's own checks."""


class FakeTokenizer:
    """A word-level tokenizer: each whitespace-separated word is one token."""

    SPECIAL = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

    def __init__(self) -> None:
        self._tokens = list(self.SPECIAL)
        self._ids = {token: i for i, token in enumerate(self._tokens)}

    @property
    def bos_token_id(self) -> int:
        return self._ids["<s>"]

    @property
    def eos_token_id(self) -> int:
        return self._ids["</s>"]

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def _id(self, word: str) -> int:
        if word not in self._ids:
            self._ids[word] = len(self._tokens)
            self._tokens.append(word)
        return self._ids[word]

    def encode(
        self,
        text: str,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        ids = [self._id(word) for word in text.split()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return " ".join(self.piece(i, skip_special_tokens).strip() for i in ids).strip()

    def piece(self, token_id: int, skip_special_tokens: bool) -> str:
        """The text one generated token adds to the output."""
        if token_id < len(self.SPECIAL) and skip_special_tokens:
            return ""
        return " " + self._tokens[token_id]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        # Same defaults as transformers: tokenize unless told not to, no generation prompt.
        parts = ["<s>"]
        # Other keyword arguments are template variables (as in transformers); the toy
        # template shows them so a test can see they arrived.
        parts += [f"<|{k}={v}|>" for k, v in sorted(kwargs.items()) if k != "conversation"]
        if tools:
            parts += ["<|tools|>", *(t["function"]["name"] for t in tools), "<|end|>"]
        for message in kwargs.get("conversation", messages):
            role = message["role"]
            if role not in ("system", "user", "assistant", "tool"):
                raise TemplateError(
                    f"Conversation roles must be system, user, assistant or tool: {role}"
                )
            parts += [f"<|{role}|>", message["content"] or ""]
            for call in message.get("tool_calls", ()):
                # Templates take the arguments as a mapping (vLLM's chat utils parse them).
                assert isinstance(call["function"]["arguments"], dict)
                parts += [
                    "<tool_call>",
                    json.dumps(
                        {
                            "name": call["function"]["name"],
                            "arguments": call["function"]["arguments"],
                        }
                    ),
                    "</tool_call>",
                ]
            parts.append("<|end|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        text = " ".join(parts)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def sampler(seed: int | None, temperature: float, prompt_token_ids: list[int]) -> random.Random:
    """The toy model's randomness: fixed by the seed, or by the prompt when sampling greedily."""
    if seed is not None:
        return random.Random(seed)
    if temperature == 0.0:
        return random.Random(hash(tuple(prompt_token_ids)))
    return random.Random()


def embedding(token_ids: list[int], dimensions: int | None, normalize: bool) -> list[float]:
    """The toy model's pooled vector: fixed by the tokens, cut to `dimensions`, then normalised."""
    rng = random.Random(hash(tuple(token_ids)))
    vector = [rng.uniform(-1.0, 1.0) for _ in range(EMBEDDING_SIZE)][: dimensions or None]
    if normalize:
        norm = math.sqrt(sum(x * x for x in vector))
        vector = [x / norm for x in vector]
    return vector


class FakeTensor:
    """Stands for the 1-D torch.Tensor in PoolingOutput.data."""

    ndim = 1

    def __init__(self, values: list[float]) -> None:
        self._values = list(values)

    def tolist(self) -> list[float]:
        return list(self._values)
