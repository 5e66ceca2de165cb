"""vitalwire: real-time vital-signs monitoring."""

__version__ = "0.1.0"
