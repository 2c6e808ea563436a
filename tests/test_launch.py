"""fast_launch: its cache key never merges two arguments Triton specialises apart, and a launch through it computes
what the kernel launched through Triton does (on the GPU, where it calls compiled kernels directly)."""

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from hf_longattn.kernels import SparsePattern, sparse_attention, sparse_attention_reference  # noqa: E402
from hf_longattn.kernels.launch import _Layout  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

INTS = [0, 1, 2, 15, 16, 17, 32, 4096, 131072, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -1, -16, -(2**31),
        -(2**31) - 1, 2**62, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 16]


def triton_specialisation(arg):
    """Triton's own specialisation of a non-constexpr argument, as its binder computes it for a CUDA kernel."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
        return native_specialize_impl(CUDABackend, arg, False, True, True)
    except (ImportError, TypeError) as error:  # the binder's internals differ in this Triton version
        pytest.skip(f"this Triton ({triton.__version__}) has no native_specialize_impl of the known signature: {error}")


def key(arg):
    """fast_launch's key of a launch whose one argument is `arg` (None: it launches through Triton)."""
    return _Layout((type(arg),)).key((arg,))


def test_the_cache_key_separates_whatever_triton_specialises_apart():
    storage = torch.zeros(64, dtype=torch.bfloat16)
    tensors = [storage[i:] for i in range(10)] + [storage.float()[i:] for i in range(6)] + [storage.int()[1:]]
    values = INTS + tensors + [0.5, 1.0, True, False, None]
    keyed = [v for v in values if key(v) is not None]
    assert len(keyed) == len(values) - sum(not -(2**31) <= v < 2**31 for v in INTS)  # wide ints: through Triton
    for a, b in itertools.combinations(keyed, 2):
        if type(a) is type(b) and key(a) == key(b):
            assert triton_specialisation(a) == triton_specialisation(b), (a, b)
    # and it does not keep apart what needs no separate kernel: one key for the tensors of one dtype and alignment
    assert len({key(t) for t in tensors[:10]}) == 2


def test_the_cache_key_of_mixed_arguments_is_the_key_of_each():
    """Packed by type, the key of a launch still follows every argument: change one and the key changes."""
    storage = torch.zeros(64, dtype=torch.bfloat16)
    args = (storage, 16, None, 0.5, storage[8:], 1, True, 17)
    layout = _Layout(tuple(map(type, args)))
    for i, changed in [(0, storage[1:]), (1, 17), (2, 3), (4, storage[9:]), (5, 2), (6, False), (7, 32)]:
        assert layout.key(args[:i] + (changed,) + args[i + 1:]) != layout.key(args), i
    assert layout.key(args[:3] + (0.25,) + args[4:]) == layout.key(args)  # floats are not specialised


@gpu
@pytest.mark.gpu
def test_decode_through_fast_launch_matches_the_reference_as_lengths_and_alignment_change():
    from hf_longattn.kernels.triton_decode import _sparse_decode_kernel

    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(1, 2, 700, 66, generator=gen).cuda().to(torch.bfloat16)
    query = torch.randn(1, 8, 1, 64, generator=gen).cuda().to(torch.bfloat16)
    # Growing caches, first 16-byte aligned, then views that start a few bytes in (a kernel compiled for aligned rows
    # would read them wrongly): each must get a kernel of its own, and the repeats must reuse it.
    for offset, k_len in [(0, 300), (0, 301), (0, 320), (2, 301), (2, 320), (0, 333), (1, 333), (0, 1)] * 2:
        key = storage[..., :k_len, offset:offset + 64]
        value = storage[..., 1:k_len + 1, offset:offset + 64]
        pattern = SparsePattern(torch.tensor([[[[0, 2]]] * 2], dtype=torch.int32, device="cuda"),
                                torch.full((1, 2, 1), 2, dtype=torch.int32, device="cuda"), 16, 16, 16, 64)
        out = sparse_attention(query, key, value, pattern)
        expected = sparse_attention_reference(query.float(), key.float(), value.float(), pattern)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert _sparse_decode_kernel.compiled, "the decode kernel did not go through fast_launch's cache"


def test_constexprs_passed_by_position_are_keyed_by_value():
    """Two tile sizes (32, 64) look alike to the integer key (both multiples of 16): a constexpr must be keyed by
    its value, whether passed by name or by position."""
    from hf_longattn.kernels.triton_decode import _sparse_decode_kernel

    names = [_sparse_decode_kernel.names[i] for i in _sparse_decode_kernel.constexprs]
    assert {"BLOCK_N", "HEAD_DIM", "SOFTCAP"} <= set(names) and not {"k_len", "Q", "stride_kh"} & set(names)
    x, types = torch.zeros(4), (torch.Tensor, int)
    assert _Layout(types, frozenset([1])).key((x, 32)) != _Layout(types, frozenset([1])).key((x, 64))
    assert _Layout(types).key((x, 32)) == _Layout(types).key((x, 64))  # a runtime int: one kernel for both


def test_fast_launch_calls_triton_once_a_key_then_the_compiled_kernel():
    """The caching logic, with a stand-in for a Triton kernel (a CPU has no compiled kernels to call directly)."""
    from types import SimpleNamespace

    from hf_longattn.kernels.launch import FastLaunch

    launches, direct, hooks = [], [], []

    class Compiled:
        function = packed_metadata = None

        def launch_metadata(self, grid, stream, *params):
            return {"grid": grid}

        def run(self, x, y, z, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *params):
            direct.append(((x, y, z), params))
            hooks.append((launch_metadata, enter_hook, exit_hook))

    class StandIn:  # kernel[grid](...) launches through Triton and returns the compiled kernel
        @staticmethod
        def fn(X, n, BLOCK: "tl.constexpr", EVEN: "tl.constexpr" = True):  # noqa: F821
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs)) or Compiled()

    fast = FastLaunch(StandIn())
    fast._direct, fast._device, fast._stream = True, (lambda: 0), (lambda device: 0)
    fast._runtime = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    x = torch.zeros(8)
    fast[(2,)](x, 5, BLOCK=32)
    fast[(3, 2)](x, 6, BLOCK=32)  # same key: the compiled kernel, every parameter in order, the default filled in
    assert len(launches) == 1 and direct == [((3, 2, 1), (x, 6, 32, True))]
    for n, block in [(16, 32), (1, 32), (5, 64)]:  # divisible by 16, equal to 1, another constexpr: new kernels
        fast[(2,)](x, n, BLOCK=block)
    fast[(2,)](x[1:], 5, BLOCK=32)  # 4 bytes in: not 16-byte aligned
    assert len(launches) == 5 and len(direct) == 1
    for _ in range(2):  # a runtime argument by name is keyed by value: through Triton every time, nothing kept
        fast[(2,)](x, n=5, BLOCK=32)
    assert len(launches) == 7 and len(fast.compiled) == 5
    fast[(2,)](x, 5, 64)
    fast[(2,)](x, 5, 64)  # a constexpr by position, keyed by its value
    assert len(launches) == 8 and direct[-1] == ((2, 1, 1), (x, 5, 64, True))
    # Launch hooks: Triton keeps them as chains, never None. An empty chain is no hook: no metadata, nothing to call.
    chain = triton.knobs.HookChain if hasattr(triton, "knobs") else None
    if chain is not None:
        fast._runtime = SimpleNamespace(launch_enter_hook=chain(), launch_exit_hook=chain(reversed=True))
        fast[(2,)](x, 5, 64)
        assert hooks[-1] == (None, None, None)
        fast._runtime.launch_enter_hook.add(print)
        fast[(2,)](x, 5, 64)
        assert hooks[-1] == ({"grid": (2,)}, fast._runtime.launch_enter_hook, None)


def test_dependent_launch_only_where_the_gpu_and_triton_have_it():
    from hf_longattn.kernels.launch import dependent_launch

    assert dependent_launch(torch.device("cpu")) == {}
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        assert dependent_launch(torch.device("cuda")) == {}  # before Hopper: no programmatic dependent launch


@gpu
@pytest.mark.gpu
def test_dependent_launches_compute_what_ordinary_launches_do(monkeypatch):
    """HiP decode steps chained as layers are (each step's output is the next one's query), its three kernels launched
    to overlap each other's ends, against the same launched one after another: bit for bit the same."""
    from hf_longattn.kernels import launch
    from hf_longattn.methods.base import AttentionCall
    from hf_longattn.methods.hip import Hip, HipConfig

    if not launch.dependent_launch(torch.device("cuda")):
        pytest.skip("this GPU or Triton has no programmatic dependent launch")
    gen = torch.Generator("cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    layers = [(randn(1, 8, 32768, 128), randn(1, 8, 32768, 128)) for _ in range(3)]
    first = randn(1, 32, 1, 128)

    def run(steps=8):
        outs, query = [], first
        for step in range(steps):
            key, value = layers[step % len(layers)]
            out = Hip(HipConfig()).attend(query, key, value, AttentionCall(0, 128**-0.5, None, None))
            outs.append(out)
            query = out.reshape(1, 1, 32, 128).transpose(1, 2) * 4  # the next step depends on this one's output
        torch.cuda.synchronize()
        return torch.stack(outs)

    overlapped = run()
    monkeypatch.setattr(launch, "DEPENDENT_LAUNCH", False)
    assert torch.equal(overlapped, run())
