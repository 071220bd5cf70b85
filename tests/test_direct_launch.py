"""Repeat kernel launches without the JIT's dispatch (``ops._launch``), on a machine without a GPU:
a stand-in JIT function and compiled kernel record what the launcher is handed. (On the GPU every
case of benchmarks/kernel_check.py launches through this path, half of them a second time under a
warm key.)"""

from __future__ import annotations

import dataclasses
import types

import pytest
from triton import knobs

from ditfastattn.ops import _launch


class FakeCompiled:
    def __init__(self):
        self.function, self.packed_metadata = object(), object()
        self.runs, self.metadata_requests = [], []

    def launch_metadata(self, grid, stream, *args):
        self.metadata_requests.append((grid, stream, args))
        return {"grid": grid}

    def run(self, *args):
        self.runs.append(args)


class FakeJit:
    """``fn[grid](*args, **kwargs)`` as Triton's JIT: launches and returns the compiled kernel."""

    arg_names = ["X", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, future=False, declined=False):
        self.launches, self.compiled, self.future, self.declined = [], [], future, declined

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            if self.declined:
                return None
            self.compiled.append(FakeCompiled())
            kernel = self.compiled[-1]
            return types.SimpleNamespace(result=lambda: kernel) if self.future else kernel

        return launch


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in for Triton's active driver: settable current device and stream."""
    state = types.SimpleNamespace(device=0, stream={0: 111, 1: 222})
    active = types.SimpleNamespace(get_current_device=lambda: state.device,
                                   get_current_stream=lambda device: state.stream[device])
    monkeypatch.setattr(_launch, "driver", types.SimpleNamespace(active=active))
    return state


def test_first_launch_per_key_goes_through_the_jit_later_ones_call_the_compiled_kernel(gpu):
    fn = FakeJit()
    launches = _launch.DirectLaunches(fn)
    constexprs, options = {"FLAG": True, "BLOCK": 64}, {"num_warps": 8}
    launches("key", (5,), ("x0", 7, 0.5), constexprs, options)
    assert fn.launches == [((5,), ("x0", 7, 0.5), {"FLAG": True, "BLOCK": 64, "num_warps": 8})]
    assert fn.compiled[0].runs == []

    launches("key", (5,), ("x1", 7, 0.25), constexprs, options)
    assert len(fn.launches) == 1
    kernel = fn.compiled[0]
    # the grid padded to three dimensions, the stream of the current device, constexprs in parameter order
    assert kernel.runs == [(5, 1, 1, 111, kernel.function, kernel.packed_metadata, None, None, None,
                            "x1", 7, 0.25, 64, True)]

    launches("other key", (5,), ("x2", 9, 0.5), constexprs, options)
    assert len(fn.launches) == 2 and len(launches) == 2


def test_each_device_compiles_its_own(gpu):
    fn = FakeJit()
    launches = _launch.DirectLaunches(fn)
    launches("key", (1, 2), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    gpu.device = 1
    launches("key", (1, 2), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    assert len(fn.launches) == 2
    launches("key", (1, 2), ("y", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    assert fn.compiled[0].runs == [] and fn.compiled[1].runs[0][:4] == (1, 2, 1, 222)


def test_launch_hooks_see_direct_launches(gpu):
    fn = FakeJit()
    launches = _launch.DirectLaunches(fn)
    launches("key", (3,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        launches("key", (3,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    kernel = fn.compiled[0]
    (run,) = kernel.runs
    assert kernel.metadata_requests == [((3, 1, 1), 111, ("x", 1, 1.0, 16, False))]
    assert run[6] == {"grid": (3, 1, 1)}
    assert run[7] is knobs.runtime.launch_enter_hook and run[8] is knobs.runtime.launch_exit_hook


def test_asynchronous_compilation_future_is_resolved(gpu):
    fn = FakeJit(future=True)
    launches = _launch.DirectLaunches(fn)
    launches("key", (1,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    launches("key", (1,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    assert len(fn.compiled[0].runs) == 1


@dataclasses.dataclass
class Descriptor:
    base: object
    shape: list
    block_shape: list

    def __post_init__(self):
        assert self.base is not None, "checked once, when the template is built"


def test_rebased_copies_the_template_over_a_new_base_without_its_checks():
    template = _launch.rebased(Descriptor("first", [4, 8], [2, 8]), None)
    assert template.base is None and template.shape == [4, 8]
    descriptor = _launch.rebased(template, "second")
    assert type(descriptor) is Descriptor
    assert (descriptor.base, descriptor.shape, descriptor.block_shape) == ("second", [4, 8], [2, 8])
    assert template.base is None


def test_a_plain_callable_hook_counts_as_active(gpu, monkeypatch):
    """Triton releases before hook chains held a bare callable or None in the same place."""
    fn = FakeJit()
    launches = _launch.DirectLaunches(fn)
    launches("key", (2,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    seen = []
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", seen.append)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", None)
    launches("key", (2,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    (run,) = fn.compiled[0].runs
    assert run[6] == {"grid": (2, 1, 1)} and run[7] == seen.append and run[8] is None


def test_a_launch_the_jit_did_not_compile_stays_with_the_jit(gpu):
    fn = FakeJit(declined=True)  # as when a JIT cache hook declines
    launches = _launch.DirectLaunches(fn)
    for _ in range(2):
        launches("key", (1,), ("x", 1, 1.0), {"BLOCK": 16, "FLAG": False}, {})
    assert len(fn.launches) == 2 and len(launches) == 0
