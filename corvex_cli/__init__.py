"""The `corvex` command: the top layer, which may import every other package."""
