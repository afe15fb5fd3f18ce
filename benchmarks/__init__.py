"""volref benchmarks: scripts that print a table and write JSON (``python -m benchmarks.<name>``).

Never timed asserts; medians of repeated runs where timing matters.
"""
