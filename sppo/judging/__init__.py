"""Judging stage: PairRM (llm-blender) estimates each prompt's K x K win-probability matrix."""
