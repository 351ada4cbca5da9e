"""Collection rules for the whole checkout, the package's doctests included."""

from __future__ import annotations

import importlib.util

#: Modules that import an optional engine when imported: collected (for their doctests)
#: only where that engine is installed, as in ``nox -s scaleout``.
_NEEDS = {"mlstore/ray.py": "ray", "mlstore/dask.py": "distributed"}

collect_ignore = [
    path for path, module in _NEEDS.items() if importlib.util.find_spec(module) is None
]
