"""Python clients: :class:`DeviceClient` for devices, :class:`MonitorClient` for clinicians."""

from vitalwire.sdk.device import DeviceClient, ReportByException
from vitalwire.sdk.monitor import MonitorClient, StreamEvent, login

__all__ = ["DeviceClient", "MonitorClient", "ReportByException", "StreamEvent", "login"]
