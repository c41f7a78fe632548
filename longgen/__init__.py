"""longgen: long videos from short-clip diffusers video models."""

__version__ = "0.1.0"
