"""fmtl-edge: energy-aware federated multi-task learning on Jetson-class edge devices.

Start with ``fmtl-edge simulate --help``; the library layout is described in docs/architecture.md.

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` for the process unless it is set already
(:func:`fmtl_edge.runtime.threads.prepare_process`): OpenMP threads that spin after their parallel
regions would turn every device-second figure into a measure of the machine's other load.
"""

from fmtl_edge.runtime.threads import prepare_process as _prepare_process

__version__ = "0.1.0"

_prepare_process()

__all__ = ["__version__"]
