"""Judging: two run files in, a verdict out, without torch.

metrics.py (per-tensor error measures), tolerances.py (thresholds: dtype defaults, calibrated,
overrides), name_map.py (candidate names to reference names; transforms.py: layouts, batch order,
splits; maps/: built-in maps such as `ldm`), scope.py (--only, --require), compare.py (the streaming
tensor-by-tensor comparison), diagnosis.py (the porting mistakes that explain a failing tensor),
verdict.py (parity or divergence, first divergence, culprit blocks), align.py (a proposed name map).
"""
