"""Helpers shared by the benchmark scripts."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model, for the header of every measured table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
