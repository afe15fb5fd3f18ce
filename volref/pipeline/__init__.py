"""The API: whole-store operations built from io, synth, engine and stages."""

from volref.pipeline.phantom import write_phantom

__all__ = ["write_phantom"]
