"""Compression: importance statistics, compression plans, checkpoint surgery and expert merging."""
