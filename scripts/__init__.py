"""The project's command lines (``python scripts/<name>.py``), thin wrappers of :mod:`pipeline`. A package so that
each ``main(argv)`` is importable as ``scripts.<name>.main`` (the tests call them in-process)."""
