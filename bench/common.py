"""The protocol between bench/kernels.py and the per-op case files bench/cases_<op>.py.

Each cases module defines ``cases(device: str, quick: bool) -> list[Case]``. ``quick`` means
tiny shapes (the CPU interpreter smoke run); otherwise the CIFAR and ImageNet shapes.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Case:
    op: str                      # e.g. "mask_mix"
    shape: str                   # human-readable, e.g. "N=256 C=3 224x224 bf16 nearest"
    make: Callable[[], tuple]    # -> (args, kwargs): fresh random inputs; tensors that
                                 #    receive gradients have requires_grad=True
    eager: Callable              # the eager twin, called as eager(*args, **kwargs)
    fused: Callable              # the fused op, same call
    bytes_fwd: int               # fewest bytes the forward must move (inputs read once, outputs written once)
    bytes_fwd_bwd: Optional[int] = None   # same for forward+backward; None: no backward timing
    flops_fwd: Optional[int] = None
    extra: dict = field(default_factory=dict)


def replace_section(path, text, name):
    """Put ``text`` between the ``<!-- {name}:begin -->`` / ``<!-- {name}:end -->`` markers of
    the markdown file ``path`` (appended with them when absent), atomically."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)
