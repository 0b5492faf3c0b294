"""Benchmarks: ``toy`` (exact gold standard on 8x8 digits), ``mnist-tshirt`` (the SISS paper's Table 2), ``instance``
(forgetting one image), ``prompt`` (a memorised prompt on a CPU replica) and ``speed`` (per-step cost).

Each benchmark is its settings (a config dataclass), its rows (a preset in ``presets/bench/``), its cells run on the
shared :mod:`.harness` and its report; what it measures is a protocol of :mod:`diffunlearn.protocols`. The command
line is :mod:`diffunlearn.commands.bench`.
"""
