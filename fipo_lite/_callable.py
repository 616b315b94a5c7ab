"""`fipo_lite.ablate(...)` and `fipo_lite.evaluate(...)`: submodules that are also notebook API functions.

Importing a submodule binds the package attribute of that name to it, which would replace a function
of the same name; so the submodule itself is made callable, and calls `fipo_lite.api.<name>`, looked up
at call time (nothing here imports the API, so imports still flow one way: api -> commands).
"""

from __future__ import annotations

import importlib
import sys
import types


def make_callable(module_name: str) -> None:
    """Let `sys.modules[module_name](...)` call the API function named like the module's last part."""
    api_name = module_name.rsplit(".", 1)[-1]

    def target():
        return getattr(importlib.import_module("fipo_lite.api"), api_name)

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return target()(*args, **kwargs)

        @property
        def __signature__(self):  # what a notebook's help shows for `fipo_lite.ablate(`
            import inspect

            return inspect.signature(target())

    sys.modules[module_name].__class__ = CallableModule
