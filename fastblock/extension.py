"""C++/CUDA extension backend (not implemented yet): reports itself unavailable."""
from .backends import BackendStatus


def status(device_type: str) -> BackendStatus:
    return BackendStatus(False, "not implemented yet")
