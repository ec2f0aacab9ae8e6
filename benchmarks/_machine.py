"""What every benchmark records about the machine it ran on, and where it writes its results."""

from __future__ import annotations

import json
import os
import platform
import socket
from typing import Any


def cpuinfo_fields() -> dict[str, str]:
    """The first processor's "key: value" lines of /proc/cpuinfo; empty where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what the platform module says."""
    return cpuinfo_fields().get("model name") or platform.processor() or platform.machine()


def cpu_family() -> str | None:
    """The CPU's "family F model M" from /proc/cpuinfo (on a VM named only "AMD EPYC", its generation), or None."""
    fields = cpuinfo_fields()
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']} model {fields['model']}"


def machine_info(**extra: Any) -> dict[str, Any]:
    """Host, CPU model and family, core count, Python version and OPENBLAS_CORETYPE, plus ``extra``."""
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cpu_family": cpu_family(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), **extra}


def write_results(name: str, result: dict[str, Any], out: str | None = None) -> str:
    """Write ``result`` as JSON to ``out`` or benchmarks/results/<name>_<host>.json; returns the path."""
    path = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               f"{name}_{socket.gethostname()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
