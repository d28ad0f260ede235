"""Benchmarks of sppo's stages against the reference pipeline's ways (`python -m bench`)."""

import os

# The Ray heads the benchmarks start (sppo.devtools.localstack) require token authentication, as the
# Makefile's do; Ray reads the mode once per process, so it is set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
