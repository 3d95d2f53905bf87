"""Benchmarks of the bundles against anchor-style baselines, run in one process and interleaved.

``timing`` (interleaved repetition, medians, ratios, peak memory, machine description), ``sampling`` (a bundle's
guided sampler vs the zoo-style batched loop, the seed-style two-call loop and MONAI's ``LatentDiffusionInferer``)
and ``training`` (the bundle's ``SupervisedTrainer`` iteration vs the seed-style step). The command is
``tools/benchmark.py`` (``benchmark-bundles``); results and how to read them are in ``docs/benchmarks.md``.
"""
