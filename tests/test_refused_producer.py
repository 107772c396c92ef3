"""A producer the consumer refuses (CURVE key not allowed) fails with clear errors, never hangs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from sage_zmq import DeliveryError, Full, QueueDescriptor
from sage_zmq.security import generate_keys, stop_authenticator


def test_producer_refused_by_curve_raises_delivery_error_within_the_timeout(
    tmp_path: Path,
) -> None:
    spub, ssec = generate_keys(tmp_path / "server", "server")
    cpub, _ = generate_keys(tmp_path / "client", "client")
    opub, osec = generate_keys(tmp_path / "other", "other")
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o700)
    shutil.copy(cpub, allowed)
    server = {
        "server_public_key": str(spub),
        "server_secret_key": str(ssec),
        "authorized_keys": str(allowed),
    }
    qd = QueueDescriptor(queue_type="tcp", metadata={"timeout": 1.0, "curve": server})
    stranger = qd.with_options(
        curve={
            "server_public_key": str(spub),
            "client_public_key": str(opub),
            "client_secret_key": str(osec),
        }
    )
    started = time.monotonic()
    try:
        # Whether the refused connection is already gone (send fails: DeliveryError) or still
        # half there (no credit ever comes: Full), put must fail within its timeout, not hang.
        with pytest.raises((DeliveryError, Full)):
            for i in range(50_000):
                stranger.put({"i": i}, timeout=1.0)
        with pytest.raises(DeliveryError) as closing:
            stranger.close()
        assert closing.value.undelivered > 0
        message = str(closing.value)  # names the likely cause, whichever way it showed
        assert "CURVE" in message and "accept this producer" in message, message
        assert time.monotonic() - started < 30
    finally:
        stranger.close()
        qd.close()
        stop_authenticator()  # the process's ZAP handler started for this consumer
