"""gatewayd: a Message Gateway (L3G / N3G) for the 3GPP MSGin5G Service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gatewayd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
