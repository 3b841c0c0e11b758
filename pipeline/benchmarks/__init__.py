"""Performance benchmarks of the pipeline (``scripts/benchmark.py`` is their command line; docs/performance.md their
results): :mod:`.cpu` (training against a plain loop, scoring, the levers), :mod:`.gpu` (the trainer's CUDA modes)
and :mod:`.scale` (the slice cache against the cohort's size), on the timing tools of :mod:`.measure`. Not copied
into the exported bundle: they measure this repository's bundle configs."""
