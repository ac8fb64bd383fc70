"""vllm/pooling_params.py: PoolingParams with the real fields and the embed-task checks."""

import copy
from typing import Any

import msgspec

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind


class PoolingParams(msgspec.Struct, omit_defaults=True, array_like=True):
    """API parameters for pooling models."""

    use_activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    task: str | None = None
    requires_token_ids: bool = False
    skip_reading_prefix_cache: bool | None = None
    extra_kwargs: dict[str, Any] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY

    def __post_init__(self) -> None:
        if self.output_kind != RequestOutputKind.FINAL_ONLY:
            raise VLLMValidationError(
                f"For pooling output_kind has to be FINAL_ONLY, got {self.output_kind!r}"
            )

    def clone(self) -> "PoolingParams":
        return copy.deepcopy(self)

    def verify(self, model_config: Any) -> None:
        """Run by the engine when the request is added, as in `InputProcessor`."""
        if self.task not in ("embed", "token_embed"):
            raise ValueError(f"Unknown pooling task: {self.task!r}")
        if self.use_activation is None:
            self.use_activation = True
        if self.dimensions is None:
            return
        name = model_config.served_model_name
        if not model_config.is_matryoshka:
            raise VLLMValidationError(
                f"Model {name!r} does not support Matryoshka embeddings; dimensions must be "
                f"unset (received dimensions={self.dimensions})."
            )
        if not 1 <= self.dimensions <= model_config.embedding_size:
            raise VLLMValidationError(
                f"Model {name!r} only supports dimensions in range "
                f"[1, {model_config.embedding_size}], got {self.dimensions}."
            )
