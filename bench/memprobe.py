"""Peak-memory probes shared by the benches (Linux /proc): the kernel's VmHWM, resettable."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmHWM, VmRSS, RssAnon ...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset this process's peak-RSS counter (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
