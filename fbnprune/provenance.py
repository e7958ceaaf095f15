"""Provenance shared by runs, exports and benchmarks: package versions, git commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fbnprune._version import __version__


def versions() -> dict[str, Any]:
    """fbnprune, torch, transformers, lm-eval and Python versions and the git commit of the checkout."""
    import transformers  # imported on call: loading it takes seconds, and machine() does not need it

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    try:
        from importlib.metadata import version

        lm_eval_v: str | None = version("lm_eval")
    except Exception:  # noqa: BLE001 - optional dependency, any failure means "unknown"
        lm_eval_v = None
    return {"fbnprune": __version__, "git_sha": sha, "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": lm_eval_v, "python": platform.python_version()}


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and current load (the machine may be shared: load average says how busy)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "cores": cores, "mem_gb": mem_gb, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "loadavg": [round(x, 2) for x in load],
            "busy": load[0] > 0.5 * cores}
