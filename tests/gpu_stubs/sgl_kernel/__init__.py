"""Import stand-in for SGLang's compiled `sgl_kernel` package, for the lent GPU machine only.

The real wheel is several hundred MB and cannot travel to that machine, yet SGLang imports
it at module level on CUDA. This stand-in lets those imports succeed; every attribute is a
stand-in that raises when called, so any code path that really needs sgl_kernel fails loudly instead of
computing something wrong. The expert-choice path under test (tests/integration/
test_gpu_topk.py) calls none of them. benchmarks/gpu_batch.sh puts this folder on
PYTHONPATH; nothing else does.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+ecpatch-stub"
__path__ = []  # a package, so `import sgl_kernel.x` reaches the finder below


class _Unavailable:
    """Any attribute path under sgl_kernel: attributes give more stand-ins, calling one raises."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{self._name} is a stub on this machine (tests/gpu_stubs)")

    def __repr__(self):
        return f"<sgl_kernel stub {self._name}>"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable(name)


class _StubSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_StubSubmodules())
