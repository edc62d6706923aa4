"""Loads deploy/stack.py (a script, not a package) as a module for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PATH = Path(__file__).resolve().parents[2] / "deploy" / "stack.py"


def load() -> ModuleType:
    if "kairos_stack" in sys.modules:
        return sys.modules["kairos_stack"]
    spec = importlib.util.spec_from_file_location("kairos_stack", PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kairos_stack"] = module
    spec.loader.exec_module(module)
    return module
