"""From a finished run to the device: ONNX export of the task models and onnxruntime benchmarks.

- :mod:`fmtl_edge.deploy.onnx_export`: one ONNX file per task model (backbone + head) and, for every
  group of tasks that shares one backbone (a MAS split, all-in-one), one shared-backbone model with
  one output per task; each export is checked against the PyTorch model with onnxruntime.
- :mod:`fmtl_edge.deploy.bench_infer`: latency, throughput and energy per inference of an ONNX model.
- :mod:`fmtl_edge.deploy.cli`: ``fmtl-edge export`` and ``fmtl-edge bench-infer``.

Needs the ``onnx`` extra (``pip install '.[onnx]'``: onnx, onnxruntime, onnxscript); importing this
package does not.
"""

ONNX_EXTRA_HINT = "install the onnx extra: pip install 'fmtl-edge[onnx]' (from a checkout: pip install '.[onnx]')"


def require_onnx() -> None:
    """Raise ImportError naming the extra when onnx / onnxruntime / onnxscript are missing."""
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; {ONNX_EXTRA_HINT}")
