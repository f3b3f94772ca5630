"""``/readyz`` asks etcd: 503 within seconds of etcd stopping, 200 again after it restarts."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from lpmosd.etcd_process import EtcdProcess

from .kit import DaemonThread, quick_config


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Poll ``predicate``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {what} within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - start


def test_readyz_follows_etcd(private_etcd: EtcdProcess) -> None:
    config = quick_config(private_etcd.endpoints, request_timeout=2.0)
    with DaemonThread(config) as d, httpx.Client(timeout=10) as http:
        urls = [d.control_url + "/readyz", d.regional_url + "/readyz"]

        def codes() -> list[int]:
            return [http.get(u).status_code for u in urls]

        wait_until("ready", lambda: codes() == [200, 200], 10)
        for url in urls:
            body = http.get(url).json()
            assert body["ready"] is True and body["etcd"]["leader"] is True
            assert http.get(url.replace("/readyz", "/healthz")).status_code == 200

        private_etcd.stop()
        took = wait_until("unready", lambda: codes() == [503, 503], 5)
        assert took < 5
        body = http.get(urls[0]).json()
        assert body["ready"] is False and "error" in body["etcd"]
        # Alive all the same: the process is fine, only its dependency is not.
        assert http.get(d.control_url + "/healthz").status_code == 200

        private_etcd.start()
        wait_until("ready again", lambda: codes() == [200, 200], 30)
