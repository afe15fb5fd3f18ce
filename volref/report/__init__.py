"""Figures and reports volref makes of its own stores (matplotlib, headless)."""

from volref.report.panel import refinement_panel
from volref.report.snapshot import snapshot

__all__ = ["refinement_panel", "snapshot"]
