"""Benchmarks against peers (issue 6): each figure is a ratio against an anchor measured in the same run.

Run ``python benchmarks/run.py [--quick] [--only P1,P2]``; see :mod:`benchmarks.run`.
"""
