"""Tests of dq.calibration: tuples, cache and the DataModule."""
