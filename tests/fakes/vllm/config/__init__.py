"""vllm/config: the parts of VllmConfig that the adapter and the fake engine read."""

import os
from dataclasses import dataclass, field
from typing import Any

from vllm import _fake


@dataclass
class ModelConfig:
    model: str = "Qwen/Qwen3-0.6B"
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    runner_type: str = "generate"
    max_model_len: int = _fake.NATIVE_MAX_MODEL_LEN
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    embedding_size: int = _fake.EMBEDDING_SIZE
    is_matryoshka: bool = True
    max_logprobs: int = 20

    def get_vocab_size(self) -> int:
        return _fake.VOCAB_SIZE

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The model's non-default sampling parameters, as in vLLM."""
        src = self.generation_config
        config = {} if src == "vllm" else dict(_fake.CHECKPOINT_GENERATION_CONFIG)
        config.update(self.override_generation_config)
        available_params = [
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "max_new_tokens",
            "skip_special_tokens",
        ]
        diff = {p: config[p] for p in available_params if config.get(p) is not None}
        if "max_new_tokens" in diff:
            diff["max_tokens"] = diff.pop("max_new_tokens")
        return diff


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class CacheConfig:
    gpu_memory_utilization: float = 0.92
    enable_prefix_caching: bool = True
    block_size: int = _fake.BLOCK_SIZE


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 1024


@dataclass
class VllmConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)


def visible_device_count() -> int:
    """current_platform.device_count(): the node's GPUs, narrowed by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return _fake.GPUS_PER_NODE
    return len([device for device in visible.split(",") if device.strip()])
