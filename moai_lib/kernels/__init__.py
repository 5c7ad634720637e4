"""Selective-scan and causal-conv kernels behind one dispatch point (see `dispatch.py`)."""

from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    causal_conv1d,
    causal_conv1d_update,
    resolve_backend,
    selective_scan,
    selective_state_update,
)
from .reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
