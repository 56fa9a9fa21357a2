"""The fault suite (issue 18): real processes, faults injected with signals, ports, full disks and restarts."""
