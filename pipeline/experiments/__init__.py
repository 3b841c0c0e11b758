"""Experiments run through the bundle: sweeps over variants and seeds, compared from MLflow (:mod:`.sweep`,
:mod:`.comparison`). Not copied into the exported bundle."""
