"""The connections one worker thread owns: a requests Session and boto3 clients."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from .._redact import redact_third_party_logs

__all__ = ["Resources", "require_boto3"]

# (connect, read) seconds for boto3 clients, as requests_kwargs.DEFAULT_TIMEOUT for HTTP.
_AWS_TIMEOUT = (5.0, 30.0)


def _environment_shapes_requests() -> bool:
    """True when the environment holds proxies or netrc, which requests reads per request
    (by host); otherwise a session can skip reading the environment on every call."""
    names = {name.lower() for name in os.environ}
    if names & {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "netrc"}:
        return True
    home = os.path.expanduser("~")
    return any(os.path.exists(os.path.join(home, f)) for f in (".netrc", "_netrc"))


def _environment_ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment (same names, same order)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def require_boto3() -> Any:
    try:
        import boto3  # noqa: PLC0415 - optional extra, imported on first AWS use
    except ImportError as exc:
        raise ImportError(
            "offload.aws() needs boto3, an optional extra: pip install offload[aws]"
        ) from exc
    return boto3


class Resources:
    """The connections one worker thread owns: a requests Session and boto3 clients.

    One per worker thread, never shared: neither a Session nor a boto3 client creation is
    safe to share across threads, and neither may survive a fork.
    """

    def __init__(self) -> None:
        self._session: requests.Session | None = None
        #: The environment's CA bundle, read once when the session does not read it per call.
        self.ca_bundle: str | None = None
        self._boto_session: Any = None
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """This thread's event loop for `async def` tasks, made when first needed and
        closed with the other connections (when the worker thread exits)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.new_event_loop()
        return loop

    def session(self) -> requests.Session:
        """The pooled session, made on first use, with requests' own retries off."""
        if self._session is None:
            redact_third_party_logs()
            session = requests.Session()
            # requests looks up proxies, CA bundles and netrc in the environment on every
            # request (a quarter of its per-call cost, scanning os.environ twice): skip that
            # unless proxies or netrc are set, taking a CA bundle from it once, here.
            session.trust_env = _environment_shapes_requests()
            bundle = None if session.trust_env else _environment_ca_bundle()
            if bundle is not None:
                session.verify = bundle
            self.ca_bundle = bundle
            adapter = HTTPAdapter(max_retries=0)  # one retry layer: offload's
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session = session
        return self._session

    def client(self, service: str, region: str | None) -> Any:
        """A boto3 client per (service, region), with botocore's retries off.

        Made from this thread's own boto3 Session (the default one is not thread-safe).
        AWS_ENDPOINT_URL and the other AWS_* variables apply as boto3 reads them.
        """
        client = self._clients.get((service, region))
        if client is None:
            boto3 = require_boto3()
            from botocore.config import Config  # noqa: PLC0415

            if self._boto_session is None:
                redact_third_party_logs()
                self._boto_session = boto3.session.Session()
            config = Config(
                # botocore 1.44 changed the default mode: say it. One attempt per call.
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=_AWS_TIMEOUT[0],
                read_timeout=_AWS_TIMEOUT[1],
            )
            client = self._boto_session.client(service, region_name=region, config=config)
            self._clients[(service, region)] = client
        return client

    def close(self) -> None:
        """Close every connection; the next use makes new ones."""
        session, self._session = self._session, None
        clients, self._clients = list(self._clients.values()), {}
        if session is not None:
            session.close()
        for client in clients:
            close = getattr(client, "close", None)
            if close is not None:
                close()
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            _close_loop(loop)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what a task left running, finish async generators and the default executor,
    then close: no "unclosed loop" or "task destroyed" warnings."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
