"""Python clients: :class:`DeviceClient` for devices, :class:`MonitorClient` for clinicians.

Both verify TLS certificates for ``https://`` / ``wss://`` with :func:`tls.client_context` unless
given ``ssl=`` (see :mod:`vitalwire.sdk.tls`).
"""

from vitalwire.sdk import tls
from vitalwire.sdk.device import DeviceClient, ReportByException
from vitalwire.sdk.errors import ConnectFailed, LoginRefused, RequestError
from vitalwire.sdk.monitor import MonitorClient, StreamEvent, login

__all__ = [
    "ConnectFailed",
    "DeviceClient",
    "LoginRefused",
    "MonitorClient",
    "ReportByException",
    "RequestError",
    "StreamEvent",
    "login",
    "tls",
]
