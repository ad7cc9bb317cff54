"""Whether the Hugging Face hub can be reached from here, told in well under a second.

huggingface_hub retries every request that cannot connect five times over ~26 s, and transformers asks the hub for
each optional file of a model (chat template, generation config, ...) in turn. Measured offline: a hub id that IS in
the local cache took 2 min 28 s to load, and one that is not ~27 s to fail. When the hub's host name does not
resolve, or resolves but does not take a connection within a few seconds (a firewall that drops it), nothing can be
downloaded, so loads go straight to the local cache and fail at once when it lacks them.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterator

_TRUE = ("1", "on", "yes", "true")
CONNECT_SECONDS = 3.0  # how long the probe waits for the hub to take a connection (a handshake takes well under 1 s)
_offline_lock = threading.Lock()


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from this process, or None when it may be (then the libraries try).

    Returns "HF_HUB_OFFLINE is set" when offline mode is on, "<host> does not resolve" when the hub's host name
    (``HF_ENDPOINT``'s) has no address, "<host> does not take a connection (...)" when it resolves but a TCP
    connection to its port is refused or not answered within ``CONNECT_SECONDS``; None when it takes one, or when a
    proxy is set for it (the proxy resolves names and connects, so a failing local lookup says nothing).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(constants.ENDPOINT)
    host = url.hostname
    proxies = urllib.request.getproxies()
    if not host or ((proxies.get("https") or proxies.get("all")) and not urllib.request.proxy_bypass(host)):
        return None
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror:
        return f"{host} does not resolve"
    except OSError:
        return None
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except socket.timeout:
        return f"{host} does not take a connection (no answer on port {port} within {CONNECT_SECONDS:g} s)"
    except OSError as e:
        return f"{host} does not take a connection (port {port}: {e.strerror or e})"
    return None


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """huggingface_hub and datasets in their offline mode for the block: they read only their local caches.

    Their switch is the ``HF_HUB_OFFLINE`` variable, read once at import, so the block sets the flags it became;
    a lock keeps two blocks from restoring each other's values.
    """
    import datasets.config
    from huggingface_hub import constants

    with _offline_lock:
        saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
