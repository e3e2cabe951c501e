"""Recurrence ops: linear scans, Mamba selective scan, Mamba-2 SSD, S4 kernels, causal conv1d."""
