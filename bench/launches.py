"""Recording the fused kernels' launches without running them (``bench/gpu_aot.py`` compiles
what it records; ``bench/counts.py`` counts their launches and bytes).

``recording()`` swaps every module-level kernel object of ``fastmix.kernels`` that a launcher
indexes (``name[grid](...)``: a ``JITFunction``, an ``Autotuner`` or, under
``TRITON_INTERPRET=1``, an ``InterpretedFunction``) for a recorder; the launchers themselves run
unchanged (their tile sizes, flags, output allocations), so what is recorded is what a GPU
would launch. The kernels' outputs are left unwritten.
"""
from triton.runtime.jit import KernelInterface


class Recorder:
    """Stands in for a launched kernel: ``rec[grid](*args, **kw)`` appends
    ``(name, target, args, kwargs)`` to the log."""

    def __init__(self, name, target, log):
        self.name, self.target, self.log = name, target, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.target, args, kwargs))
        return launch


def arg_names(target):
    """The kernel's parameter names (an Autotuner's are its function's)."""
    names = getattr(target, "arg_names", None)
    return list(names if names is not None else target.fn.arg_names)


class recording:
    """Context; ``with recording() as log:`` records the launches made inside it."""

    def __init__(self):
        self.log, self.saved = [], []

    def __enter__(self):
        from fastmix.kernels import mask_mix, mixblock_attn, mixed_ce
        for mod in (mixblock_attn, mask_mix, mixed_ce):
            src = open(mod.__file__).read()
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, KernelInterface) and f"{name}[" in src:
                    self.saved.append((mod, name, obj))
                    setattr(mod, name, Recorder(f"{mod.__name__.split('.')[-1]}.{name}", obj,
                                                self.log))
        return self.log

    def __exit__(self, *exc):
        for mod, name, obj in self.saved:     # restored on exit: kernels call helpers
            setattr(mod, name, obj)           # through the module globals
        return False
