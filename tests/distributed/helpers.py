"""Start a few processes the way torchrun does (its environment variables), each with a hard time limit.

The tests start the ranks themselves rather than through torchrun for speed (one interpreter per rank, no agent)
and so that each rank's exit code and output can be checked; one test goes through torchrun itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# a collective waits at most this long for a rank that stopped answering (fbnprune.distributed)
COLLECTIVE_TIMEOUT_S = 60


@dataclass
class Rank:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment for a child: this checkout first on the path, one thread, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FBNPRUNE_DIST_TIMEOUT=str(COLLECTIVE_TIMEOUT_S))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def launch(args: list[str], *, world: int = 2, env: dict[str, str] | None = None, timeout: float = 240,
           cwd: Path | None = None) -> list[Rank]:
    """Run ``python <args>`` as ``world`` ranks of one process group; every rank is killed at ``timeout``."""
    port = free_port()
    procs = []
    for r in range(world):
        e = base_env(env)
        e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *args], env=e, cwd=cwd or REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    out = []
    try:
        for r, p in enumerate(procs):
            so, se = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            out.append(Rank(r, p.returncode, so, se))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        raise AssertionError(f"ranks still running after {timeout} s: a collective hung") from None
    return out


def run_single(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240,
               cwd: Path | None = None) -> Rank:
    """``python <args>`` as a plain single process (no launcher variables)."""
    p = subprocess.run([sys.executable, *args], env=base_env(env), cwd=cwd or REPO, capture_output=True, text=True,
                       timeout=timeout)
    return Rank(0, p.returncode, p.stdout, p.stderr)
