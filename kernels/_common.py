"""Helpers shared by the kernel modules (no Triton import here)."""
import os

import torch

# Tests set this to True so every output buffer a kernel allocates starts as NaN (floats)
# or as an impossible value (ints): an element the kernel forgets to write then fails.
POISON_OUTPUTS = False


def empty(shape, dtype, device, memory_format=torch.contiguous_format):
    """Allocate a kernel output; NaN-filled when POISON_OUTPUTS is set."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.fill_(-(2 ** 30) if dtype != torch.bool else True)
    return out


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(fn, configs, key, prune):
    """``triton.autotune`` whose tuning refuses to start inside a CUDA graph capture.

    Tuning times every config with device syncs, which a capture forbids (the capture would
    fail with a cryptic error, or record the benchmark launches). ``CUDAGraphStep`` runs the
    step eagerly before capturing it, so every key the step uses is tuned by then; a key
    first met inside a capture is a bug, reported by name. ``key`` must name every argument
    that selects a different kernel (each constexpr flag), or one tuned config is reused for
    another kernel."""
    from triton.runtime.autotuner import Autotuner

    class CaptureSafeAutotuner(Autotuner):
        def prune_configs(self, kwargs, *args):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"{self.base_fn.__name__}: autotuning would start inside a CUDA graph "
                    f"capture (a new shape, dtype or flag since the warm-up); run the step "
                    f"once eagerly with these inputs before capturing it")
            return super().prune_configs(kwargs, *args)

    return CaptureSafeAutotuner(fn, fn.arg_names, configs, key, reset_to_zero=None,
                                restore_value=None, prune_configs_by={"early_config_prune": prune})
