"""Measured peak memory of this process: CUDA allocator statistics, or peak RSS on CPU.

On a GPU this is `torch.cuda.max_memory_allocated` (tensor bytes). A CPU has
no allocator statistics, so there it is the resident set from
/proc/self/status (Linux): now, the anonymous (allocated) part; at the peak,
the kernel's high-water mark `VmHWM` minus the file-backed pages resident now
(library code paged in by the first use of a kernel is not memory the step
uses, and the kernel keeps no high-water mark of the anonymous part alone).
`reset_peak` lowers VmHWM to the current RSS by writing "5" to
/proc/self/clear_refs. For the RSS to follow the live tensors,
`release_freed_memory_promptly` makes glibc serve every allocation of 64 KiB
or more with its own mmap, returned to the kernel when freed; otherwise
malloc keeps freed blocks mapped and the high-water mark would also count
memory that is no longer in use.

    release_freed_memory_promptly()
    baseline = current_bytes()
    ...build the model...
    reset_peak()
    ...train a step...
    used = peak_bytes() - baseline
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 64 * 1024


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def release_freed_memory_promptly() -> None:
    """CPU: mmap every allocation >= 64 KiB (freed at once) instead of glibc's adaptive threshold."""
    if _on_cuda():
        return
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _status_bytes(*fields: str) -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    values = {}
    for field in fields:
        match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no {field} in /proc/self/status (peak RSS needs Linux)")
        values[field] = int(match.group(1)) * 1024
    return values


def current_bytes() -> int:
    """Bytes in use now: CUDA tensor memory, or the anonymous resident set on CPU."""
    if _on_cuda():
        return torch.cuda.memory_allocated()
    status = _status_bytes("RssAnon", "RssShmem")
    return status["RssAnon"] + status["RssShmem"]


def peak_bytes() -> int:
    """Largest `current_bytes()` since the process started or the last `reset_peak()`."""
    if _on_cuda():
        return torch.cuda.max_memory_allocated()
    status = _status_bytes("VmHWM", "RssFile")
    return status["VmHWM"] - status["RssFile"]


def reset_peak() -> None:
    """Start a new peak at the current usage."""
    if _on_cuda():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


__all__ = ["current_bytes", "peak_bytes", "release_freed_memory_promptly", "reset_peak"]
