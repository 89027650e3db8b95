"""The distillation study behind ``examples/distill_study.py``: data, models, training, metrics, report.

Everything here uses only the public API of ``drkl_kernels`` and text that ships with Python.
"""
