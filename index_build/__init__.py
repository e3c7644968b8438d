"""Offline builder: distill students, export them, build indexes and evaluate.

Torch is imported lazily inside the functions that need it.
"""
