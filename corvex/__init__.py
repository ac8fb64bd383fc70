"""Corvex: the `corvex` command and the generated wire types of the `corvex.v1` API."""
