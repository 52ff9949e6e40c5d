"""The header every CPU quality benchmark writes into its results file: device, versions, command, date."""

from __future__ import annotations

import datetime
import platform
import sys

import torch

import lowc


def report_header() -> dict:
    return {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "lowc": lowc.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
    }
