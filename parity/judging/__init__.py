"""Judging: two run files in, a verdict out, without torch.

metrics.py (per-tensor error measures), tolerances.py (thresholds: dtype defaults, calibrated,
overrides), name_map.py (candidate names to reference names), compare.py (the streaming
tensor-by-tensor comparison), verdict.py (parity or divergence, first divergence, culprit blocks).
"""
