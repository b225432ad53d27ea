"""fmtl-edge: energy-aware federated multi-task learning on Jetson-class edge devices.

Start with ``fmtl-edge simulate --help``; the library layout is described in docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
