"""Runs: the run-file format and everything that writes it.

hdf5.py (the HDF5 run file: writer, reader, validation), naming.py (tensor names and blocks),
selection.py (`--capture SPEC`), recorder.py (names, selects and streams captured values into a
writer), config.py (RunConfig: what a run is asked to do, and its metadata), cache.py (runs cached by
content). docs/run-format.md is the format's normative description.
"""
