"""Experiments that check volref against the paper (METHOD.md), on phantoms."""
