"""Engines: the seam (base.py), the simulated CPU engine and the vLLM adapter."""
