"""vllm/v1/engine. The real package also defines the engine-core wire types; the fake needs none."""
