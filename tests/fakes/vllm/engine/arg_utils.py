"""vllm/engine/arg_utils.py: AsyncEngineArgs with the fields a Corvex config can set (same
names and defaults as vLLM; an unknown keyword is a TypeError, as for the real dataclass)."""

from dataclasses import dataclass
from typing import Any

from vllm import _fake
from vllm.config import (
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
    visible_device_count,
)
from vllm.usage.usage_lib import UsageContext


@dataclass
class EngineArgs:
    """Arguments for vLLM engine."""

    model: str = ModelConfig.model
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    runner: str = "auto"
    convert: str = "auto"
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float = 0.92
    max_num_seqs: int | None = None
    disable_log_stats: bool = False
    quantization: str | None = None
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    # StructuredOutputsConfig.reasoning_parser: where structured outputs start constraining.
    reasoning_parser: str = ""

    def create_engine_config(
        self, usage_context: UsageContext | None = None, headless: bool = False
    ) -> VllmConfig:
        """Create the VllmConfig, raising ValueError for what vLLM would refuse."""
        model_config = ModelConfig(
            model=self.model,
            served_model_name=self.served_model_name,
            tokenizer=self.tokenizer or self.model,
            runner_type="generate" if self.runner == "auto" else self.runner,
            max_model_len=self._max_model_len(),
            generation_config=self.generation_config,
            override_generation_config=dict(self.override_generation_config or {}),
        )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        parallel_config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
        )
        self._check_world_size(parallel_config)
        prefix_caching = self.enable_prefix_caching
        return VllmConfig(
            model_config=model_config,
            parallel_config=parallel_config,
            cache_config=CacheConfig(
                gpu_memory_utilization=self.gpu_memory_utilization,
                # vLLM turns prefix caching on by default for generative models.
                enable_prefix_caching=(
                    model_config.runner_type == "generate"
                    if prefix_caching is None
                    else prefix_caching
                ),
            ),
            scheduler_config=SchedulerConfig(max_num_seqs=self.max_num_seqs or 1024),
        )

    def _max_model_len(self) -> int:
        derived = _fake.NATIVE_MAX_MODEL_LEN
        if self.max_model_len is None or self.max_model_len == -1:
            return derived
        if self.max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({self.max_model_len}) is greater than the "
                f"derived max_model_len (max_position_embeddings={derived} or "
                "model_max_length=None in model's config.json)."
            )
        return self.max_model_len

    @staticmethod
    def _check_world_size(parallel_config: ParallelConfig) -> None:
        # As ParallelConfig.__post_init__: a multiprocessing engine must fit on this node's
        # visible GPUs; Ray places its workers across the cluster instead.
        if parallel_config.distributed_executor_backend not in (None, "mp"):
            return
        gpu_count = visible_device_count()
        if gpu_count < parallel_config.world_size:
            raise ValueError(
                f"World size ({parallel_config.world_size}) is larger than the number of "
                f"available GPUs ({gpu_count}) in this node."
            )


@dataclass
class AsyncEngineArgs(EngineArgs):
    """Arguments for asynchronous vLLM engine."""

    enable_log_requests: bool = False
