"""Without the compiled module the kernels fall back to the Python references, never silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A process in which `import fmtl_edge._kernels` fails, as in a source tree that was never built.
_PRELUDE = "import sys; sys.modules['fmtl_edge._kernels'] = None\n"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    e.pop("FMTL_REQUIRE_NATIVE", None) if "FMTL_REQUIRE_NATIVE" not in env else None
    return subprocess.run([sys.executable, "-c", _PRELUDE + code], capture_output=True, text=True, env=e,
                          cwd=str(ROOT), timeout=120)


def test_first_use_warns_once_naming_the_fix_and_results_record_it():
    r = _run(
        "import numpy as np\n"
        "from fmtl_edge.affinity.search import best_partition\n"
        "from fmtl_edge.aggregation import weighted_average_slices\n"
        "from fmtl_edge import kernels, results\n"
        "S = np.eye(4) * 0.1 + 0.01\n"
        "best_partition(S, 2); best_partition(S, 2)\n"
        "out = np.zeros(4, np.float32)\n"
        "weighted_average_slices(out, [np.ones(4, np.float32)], [1.0], np.array([[0, 4]]), np.ones((1, 1), bool))\n"
        "import json; print(json.dumps({'mode': kernels.mode(), 'versions': results.versions()['kernels'],"
        " 'info': kernels.info()['mode']}))\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("RuntimeWarning") == 1, r.stderr
    assert "fmtl_edge._kernels is not available" in r.stderr
    assert "<string>" in r.stderr  # attributed to the caller, not to a line inside fmtl_edge
    assert "pip install ." in r.stderr and "pip install --no-build-isolation -e ." in r.stderr
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert facts == {"mode": "python-reference", "versions": "python-reference", "info": "python-reference"}


def test_no_warning_with_the_compiled_module(tmp_path):
    # run outside the checkout: the installed package (with its compiled module) is imported, not
    # the source tree, which has no compiled module unless it was installed with -e
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import numpy as np\nfrom fmtl_edge.affinity.search import best_partition\n"
            "from fmtl_edge import kernels, results\n"
            "best_partition(np.eye(4) * 0.1 + 0.01, 2)\n"
            "print(kernels.mode(), results.versions()['kernels'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["native", "native"]


def test_require_native_turns_the_fallback_into_an_error():
    r = _run("import fmtl_edge.aggregation\n", FMTL_REQUIRE_NATIVE="1")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_info_reports_python_reference():
    r = _run("from fmtl_edge.cli import main; raise SystemExit(main(['info', '--json']))",
             FMTL_EDGE_SYSFS_ROOT="/nonexistent-fmtl-root")
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout)["kernels"]
    assert k["built"] is False and k["mode"] == "python-reference" and "pip install ." in k["fix"]
