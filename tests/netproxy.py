"""The tests' TCP proxy: the one `vitalwire bench edge` uses (src/vitalwire/bench/netproxy.py)."""

from vitalwire.bench.netproxy import Proxy

__all__ = ["Proxy"]
