"""Recurrence ops: linear scans, the Mamba selective scan, Mamba-2 SSD, S4 kernels and the
causal depthwise conv1d. Each takes an initial state, returns the final state, carries state in
float32 and restarts it where ``reset`` marks a packed document's first token."""

from lsm.kernels.scan import s4
from lsm.kernels.scan.common import resets_from_segments
from lsm.kernels.scan.conv1d import ConvState, causal_conv1d, init_conv_state
from lsm.kernels.scan.linear import linear_scan
from lsm.kernels.scan.selective import selective_scan
from lsm.kernels.scan.ssd import ssd

__all__ = ["ConvState", "causal_conv1d", "init_conv_state", "linear_scan", "resets_from_segments",
           "s4", "selective_scan", "ssd"]
