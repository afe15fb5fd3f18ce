"""Figures and reports volref makes of its own stores (matplotlib, headless)."""

from volref.report.snapshot import snapshot

__all__ = ["snapshot"]
