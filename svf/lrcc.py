"""Deprecated: lrcc is its own package now (``import lrcc``); this keeps ``from svf import lrcc`` working.

Looked up by name (importlib), so ``svf`` itself never imports lrcc and works without it.
"""
import importlib
import sys
import warnings

warnings.warn("svf.lrcc is deprecated: lrcc is a sibling package of svf now; write `import lrcc`",
              DeprecationWarning, stacklevel=2)
try:
    sys.modules[__name__] = importlib.import_module("lrcc")
except ModuleNotFoundError as e:
    raise ImportError("svf.lrcc: the lrcc package is not importable; copy the lrcc/ folder next to svf/ "
                      "and write `import lrcc`") from e
