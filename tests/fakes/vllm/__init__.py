"""A fake `vllm` for tests on machines without a GPU.

It keeps the module paths, class names, signatures and output types of the parts of vLLM 0.33.0
that corvex_core/engines/vllm.py uses, and their behaviour where the adapter depends on it:
DELTA outputs merged when the consumer is slow, abort when a stream is closed or cancelled, and
an engine that can die. The "model" is a word-level toy (see _fake.py). Tests put this directory
on sys.path only inside the tests that use it.
"""

__version__ = "0.33.0+corvex.fake"

# The signature test refuses to check this package in place of the real vLLM.
CORVEX_FAKE = True
