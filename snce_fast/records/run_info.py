"""What a result file records about the run that made it: device, versions, commit, date."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def metadata(device: torch.device) -> dict[str, Any]:
    """Device, versions, commit (when run from a git checkout) and date for result files."""
    here = Path(__file__).parent
    commit = None
    try:  # only when this file is tracked by the enclosing git repository (an editable install of snce_fast)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here,
                                 capture_output=True, text=True, timeout=10).returncode == 0
        if tracked:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device), "mode": "gpu" if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
    }
