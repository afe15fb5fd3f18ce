"""volref experiments: the paper's tables, setting sweeps and diagnostics on phantoms
(``python -m experiments.<name>``); each prints a table and writes JSON (``experiments/results``).

Speed and memory measurements are in ``benchmarks``. Every script has a ``--quick`` smoke run
(``tests/test_scripts.py`` runs them all).
"""
