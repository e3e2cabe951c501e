"""Sequence-parallel recurrences: the scan ops, run per `sequence` shard and folded.

Layers call these instead of the kernels directly; with no mesh (or a `sequence` axis of size 1)
each is the plain op."""

from __future__ import annotations


def linear_scan(a, b, h0=None, *, reset=None, reverse=False, implementation=None):
  from lsm.kernels.scan.linear import linear_scan as op
  return op(a, b, h0, reset=reset, reverse=reverse, implementation=implementation)


def selective_scan(x, dt, A, B, C, **kwargs):
  from lsm.kernels.scan.selective import selective_scan as op
  return op(x, dt, A, B, C, **kwargs)


def ssd(x, dt, A, B, C, **kwargs):
  from lsm.kernels.scan.ssd import ssd as op
  return op(x, dt, A, B, C, **kwargs)


def causal_conv1d(x, weight, bias=None, *, reset=None, state=None):
  from lsm.kernels.scan.conv1d import causal_conv1d as op
  return op(x, weight, bias, reset=reset, state=state)
