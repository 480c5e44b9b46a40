"""Fuzz targets for every parser of untrusted bytes (see docs/fuzzing.md).

Nothing here imports exo_trio at package import time: atheris must instrument
exo_trio before it is first imported (fuzz/atheris_child.py).
"""
