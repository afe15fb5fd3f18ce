"""stages layer (see DESIGN.md)."""
