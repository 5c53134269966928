"""Data sources: calibration token windows."""
