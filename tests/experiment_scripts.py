"""Import a script of ``experiments/`` as a module (they are not a package): ``load("profile_step")``."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load(name: str) -> ModuleType:
    """The module of ``experiments/<name>.py``, executed once per call and registered in
    ``sys.modules`` under ``experiments_<name>`` (dataclasses, flax modules among them, look
    their module up there)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
