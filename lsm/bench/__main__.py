"""`python -m lsm.bench <benchmark> [options]`."""

import os
import sys

if sys.argv[1:2] == ["context"]:
  # Before jax is imported: the context benchmark runs on 8 CPU devices emulated in this process.
  _FLAG = "--xla_force_host_platform_device_count=8"
  if _FLAG not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

from lsm.bench import attention, context, memory, scan, sparse, streaming, train  # noqa: E402

BENCHMARKS = {"attention": attention.main, "context": context.main, "memory": memory.main,
              "scan": scan.main, "sparse": sparse.main, "streaming": streaming.main, "train": train.main}


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
    known = ", ".join(sorted(BENCHMARKS))
    print(f"usage: python -m lsm.bench {{{known}}} [options]   (--help after a name for more)")
    if argv and argv[0] not in ("-h", "--help"):
      print(f"error: unknown benchmark {argv[0]!r}; choose one of: {known}", file=sys.stderr)
      return 2
    return 0
  return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
