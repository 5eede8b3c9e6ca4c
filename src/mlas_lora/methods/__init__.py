"""Methods as a registry, in the manner of PEFT's tuners: one module per method, registered by name.

A *method* is code (how a student is built, trained, saved, decoded and exported); a *system* of an
experiment config is data: a method plus the settings it changes, e.g.
`{name: mlas-r4, method: mlas-lora, lora: {r_spe: 4}}`, or the name of a preset (presets.py). The
trainer, the runner and the CLI call the protocols of base.py and name no method.
"""

from __future__ import annotations

from mlas_lora.errors import MlasLoraError
from mlas_lora.methods.base import Method, PromptingMethod, Student, TrainedMethod

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry under `method.name` (once)."""
    if method.name in METHODS:
        raise MlasLoraError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MlasLoraError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def _register_builtin() -> None:
    """Register the METHODS of every module of this package (a new method is a new module)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            register(method)


_register_builtin()

__all__ = ["METHODS", "Method", "PromptingMethod", "Student", "TrainedMethod", "get_method", "register"]
