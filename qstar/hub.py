"""Whether the Hugging Face hub can be reached (model and data sources fall back when not)."""

from __future__ import annotations

import os
import socket


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when offline mode is set or huggingface.co does not answer within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False
