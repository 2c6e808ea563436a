"""Launching a Triton kernel with less host work than `kernel[grid](...)`, for decode's tiny kernels.

`JITFunction.run` specialises every argument again on every call, builds a string key, looks the kernel up and checks
its globals: 38-49 us of host time a launch on the H200's host for the decode kernel's 48 arguments, whose GPU
time is 16 us. Decode launched eagerly (plain generate()) is bound by that host time.

`fast_launch(kernel)` keys the compiled kernels by the properties Triton specialises an argument on (a tensor's dtype
and 16-byte alignment; an integer's being 1, its divisibility by 16 and its width; everything else by type or value)
and by the keyword arguments (constexprs and launch options). The first launch of a key goes through Triton, which
compiles or finds the kernel; later ones call the compiled kernel as `JITFunction.run` would. A key separates at least
what Triton's own specialisation does (tested against Triton's specialiser), so equal keys mean the same compiled
kernel.

The direct call follows the launcher convention of Triton 3.6 to 3.x (every parameter passed, constexprs included);
other versions, the interpreter and non-CUDA backends launch through Triton as usual.

`dependent_launch(device)`: whether the decode kernels may be launched as programmatic dependent launches (PDL,
Hopper and later). Such a kernel may start while the kernel before it ends; it waits for that kernel (and its writes)
before it touches memory, so the overlap hides only the launch and the start of its programs.
"""

from __future__ import annotations

import functools
import inspect
import os
from itertools import repeat
from functools import reduce
from operator import attrgetter, eq, itemgetter, methodcaller, mod, not_, or_

import torch
import triton

_INT32 = range(-(2**31), 2**31)


class _Layout:
    """Where a launch's tensors, integers and other arguments sit, so that `key` takes a few C-level maps: keyed in
    Python argument by argument, a launch of the decode kernel cost nearly as much host time as Triton's own."""

    def __init__(self, types: tuple, constexprs: frozenset = frozenset()):
        def getter(positions):
            return (lambda args: tuple(args[i] for i in positions)) if len(positions) < 2 else itemgetter(*positions)

        runtime = [(i, t) for i, t in enumerate(types) if i not in constexprs]
        self.tensors = getter([i for i, t in runtime if issubclass(t, torch.Tensor)])
        self.ints = getter([i for i, t in runtime if t is int])
        # By value: constexprs passed by position, None, bools, strings (floats are not specialised: by type alone).
        self.others = getter([i for i, t in enumerate(types) if i in constexprs
                              or not (t is int or t is float or issubclass(t, torch.Tensor))])

    def key(self, args) -> tuple | None:
        """What Triton's specialisation of the arguments depends on (or more): the tensors' dtypes and 16-byte
        alignment, the integers' being 1 and divisible by 16, the other arguments' values (floats: their type). None
        when an integer needs more than 32 bits (rare: those launch through Triton)."""
        tensors, ints = self.tensors(args), self.ints(args)
        if ints and not (_INT32.start <= min(ints) and max(ints) < _INT32.stop):
            return None
        pointers = tuple(map(_DATA_PTR, tensors))
        # The usual cases in one step each: every tensor aligned, no integer equal to 1.
        aligned = reduce(or_, pointers, 0) % 16 == 0 or tuple(map(not_, map(mod, pointers, repeat(16))))
        ones = 1 in ints and tuple(map(eq, ints, repeat(1)))
        divisible = tuple(map(not_, map(mod, ints, repeat(16))))
        return tuple(map(_DTYPE, tensors)), aligned, ones, divisible, self.others(args)


_DTYPE, _DATA_PTR = attrgetter("dtype"), methodcaller("data_ptr")


def _direct_launch_supported(kernel) -> bool:
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if not (3, 6) <= version < (4, 0) or not isinstance(kernel, triton.runtime.jit.JITFunction):
        return False  # other launcher conventions, or the interpreter (TRITON_INTERPRET=1)
    try:
        return triton.runtime.driver.active.get_current_target().backend == "cuda"
    except RuntimeError:  # no GPU driver
        return False


class FastLaunch:
    """`fast_launch(kernel)[grid](*args, **constexprs)`: the same launch as `kernel[grid](...)`, with less host work."""

    enabled = True  # FastLaunch.enabled = False: every launch through Triton (benchmarks/bench_launch.py compares)

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}  # key -> (compiled kernel, the parameters after the positional ones)
        self.layouts: dict[tuple, _Layout] = {}
        self._direct: bool | None = None  # whether the direct call applies, decided at the first launch
        parameters = inspect.signature(kernel.fn).parameters.values()
        self.names = [p.name for p in parameters]
        self.constexprs = frozenset(i for i, p in enumerate(parameters) if "constexpr" in str(p.annotation))
        self.runtime_names = [n for i, n in enumerate(self.names) if i not in self.constexprs]
        self.defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        if self._direct is None:
            self._direct = _direct_launch_supported(self.kernel)
            if self._direct:
                from triton import knobs

                active = triton.runtime.driver.active
                self._device, self._stream, self._runtime = active.get_current_device, active.get_current_stream, \
                    knobs.runtime
        if not (self._direct and self.enabled) or callable(grid):
            return self.kernel[grid](*args, **kwargs)
        device = self._device()
        types = tuple(map(type, args))
        layout = self.layouts.get(types)
        if layout is None:
            layout = self.layouts[types] = _Layout(types, self.constexprs)
        key = layout.key(args)
        if key is None:
            return self.kernel[grid](*args, **kwargs)
        key = (device, types, key, tuple(kwargs.items()))
        found = self.compiled.get(key)
        if found is None:  # through Triton: compiles, or finds the kernel in its caches
            compiled = self.kernel[grid](*args, **kwargs)
            # A runtime argument passed by name is keyed by its value: never kept, the cache would only grow.
            if not any(name in kwargs for name in self.runtime_names):
                tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])
                self.compiled[key] = compiled, tail
            return
        # Every parameter in signature order, constexprs included (fixed by the key), as JITFunction.run passes them.
        compiled, tail = found
        params = args + tail
        stream = self._stream(device)
        x, y, z = (*grid, 1, 1)[:3]
        enter_hook, exit_hook = _hook(self._runtime.launch_enter_hook), _hook(self._runtime.launch_exit_hook)
        # launch_metadata is None without a hook (Triton's own shortcut), and costs a call with every parameter.
        metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *params)
        compiled.run(x, y, z, stream, compiled.function, compiled.packed_metadata, metadata, enter_hook, exit_hook,
                     *params)


def _hook(hook):
    """None for no hook: Triton keeps its launch hooks as chains that are never None, and calling an empty one (and
    building the metadata for it) costs every launch host time for nothing."""
    return None if hook is None or getattr(hook, "calls", None) == [] else hook


def fast_launch(kernel) -> FastLaunch:
    return FastLaunch(kernel)


DEPENDENT_LAUNCH = True  # False: every kernel starts after the previous one ends (benchmarks compare)


def dependent_launch(device: torch.device) -> dict:
    """The launch options of a kernel that may overlap the end of the one before it on `device` ({} where it may
    not). The kernel must take `PDL: tl.constexpr` and wait (`triton_prefill._after_previous_kernel`) first."""
    return {"PDL": True, "launch_pdl": True} if DEPENDENT_LAUNCH and _pdl_capable(device) else {}


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    """Hopper or later on CUDA >= 12.3 (captured into CUDA graphs), compiled (not interpreted) Triton that has the
    launch option and the wait."""
    if device.type != "cuda" or torch.version.cuda is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    cuda = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    return ("launch_pdl" in CUDAOptions.__dataclass_fields__ and cuda >= (12, 3)
            and torch.cuda.get_device_capability(device)[0] >= 9)
