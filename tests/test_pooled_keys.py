"""Pooled keys (``pool:<p>``): geometry and cost, the method's name, the reference op against the
dense oracle (float64), the op's checks, pool plans through the runtime and the search (the GPU
path under the Triton interpreter: test_triton_kernel.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import test_static as static_tests
from conftest import flux_pipeline, make_pipeline, run_pipeline, sd3_pipeline, tiny_flux
from test_calibration import config, prompts
from test_families import FAMILIES as IMAGE_FAMILIES
from test_families import MiniPipeline, generate, prompt
from test_runtime import with_methods
from test_video_families import FAMILIES as VIDEO_FAMILIES
from test_video_families import GRID as VIDEO_GRID
from test_tile_search import methods_of, search_and_replay
from test_tiles import ODD, STEPS, check_heads

import ditfastattn
from ditfastattn import Plan, SearchConfig, ops
from ditfastattn._geometry import (
    MAX_POOL_FACTOR, MODE_FULL, MODE_SKIP, POOL_FLAG, POOL_SLOT_SHIFT, TILE_FLAG, TileGrid, density, is_pool_mode, is_tile_mode,
    kept_pairs, pool_factor, pool_mode, pooled_keys, tile_mode, window_blocks,
)
from ditfastattn.methods import parse_method
from ditfastattn.model import TokenLayout
from ditfastattn.ops._dense import dense_attention, patch_means

# (grid, global tokens before the image, after it): patches ragged along rows, cols, both, none;
# two frames; a grid smaller than a patch; text before, after, both, none.
LAYOUTS = [
    ((1, 9, 11), 7, 0),
    ((2, 6, 8), 0, 5),
    ((1, 12, 10), 4, 3),
    ((3, 5, 7), 0, 0),
    ((1, 2, 3), 6, 0),
]


def layout_of(grid, before, after) -> TokenLayout:
    image = math.prod(grid)
    return TokenLayout(before + image + after, before, image, grid)


def inputs(layout: TokenLayout, heads: int, dtype=torch.float32, seed=0, batch=2, dim=16):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, layout.seq_len, heads, dim, generator=gen) * 1.5).to(dtype) for _ in range(3)]


def twin_heads(layout: TokenLayout):
    """q, k, v of two heads with the same inputs."""
    return [t.expand(-1, -1, 2, -1).contiguous() for t in inputs(layout, 1)]


# --- geometry and names ---------------------------------------------------------------------------

def test_pool_modes_sit_between_arrows_and_tiles():
    for factor in (2, 3, MAX_POOL_FACTOR):
        mode = pool_mode(factor)
        assert is_pool_mode(mode) and not is_tile_mode(mode) and pool_factor(mode) == factor and mode < 2**31
    for other in (MODE_SKIP, MODE_FULL, 0, 7, POOL_FLAG - 1, tile_mode(0, 0, 0), TILE_FLAG):
        assert not is_pool_mode(other)
    for bad in (1, 0, MAX_POOL_FACTOR + 1, 2.0, True):
        with pytest.raises(ValueError, match="pool factor"):
            pool_mode(bad)


@pytest.mark.parametrize("grid,before,after", LAYOUTS)
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_kept_pairs_count_one_key_per_patch_and_each_loose_token(grid, before, after, factor):
    layout = layout_of(grid, before, after)
    frames, rows, cols = grid
    patches, loose = pooled_keys(grid, factor)
    assert patches == frames * (rows // factor) * (cols // factor)
    assert patches * factor**2 + loose == math.prod(grid)
    text, image, seq = before + after, layout.image_len, layout.seq_len
    tiles = TileGrid(grid)
    want = text * seq + image * (text + patches + loose)
    assert kept_pairs(pool_mode(factor), image, text, tiles) == want
    assert density(pool_mode(factor), image, text, tiles) == want / seq**2
    with pytest.raises(ValueError, match="needs the grid"):
        kept_pairs(pool_mode(factor), image, text)


def test_pool_methods_parse_name_and_cost():
    method = parse_method(" pool:2 ")
    assert method.kind == "pool" and method.factor == 2 and method.name == "pool:2" and method.needs_grid
    tiles = TileGrid((1, 64, 64))
    assert method.mode(4096, tiles) == pool_mode(2)
    # FLUX at 1024^2: 512 text tokens; image queries see 512 + 1024 keys
    assert method.cost(4096, 512, tiles) == pytest.approx((512 * 4608 + 4096 * 1536) / 4608**2)
    assert parse_method("pool:4").cost(4096, 512, tiles) < method.cost(4096, 512, tiles)
    with pytest.raises(ValueError, match="pool:2 needs the image grid"):
        method.mode(4096)
    for bad in ("pool:1", "pool:2.5", "pool:0", f"pool:{MAX_POOL_FACTOR + 1}"):
        with pytest.raises(ValueError, match="pool factor must be an int"):
            parse_method(bad)


# --- the reference op against the dense oracle --------------------------------------------------

def test_patch_means_replace_each_whole_patch_by_its_mean():
    layout = layout_of((1, 3, 5), 2, 0)
    x = torch.arange(2 * layout.seq_len, dtype=torch.float64).reshape(1, layout.seq_len, 2)
    got = patch_means(x, pool_mode(2), layout)
    grid = x[0, 2:].reshape(3, 5, 2)
    assert torch.equal(got[0, :2], x[0, :2])  # text untouched
    image = got[0, 2:].reshape(3, 5, 2)
    assert torch.equal(image[0, 0], grid[:2, :2].mean(dim=(0, 1))) and torch.equal(image[1, 3], grid[:2, 2:4].mean((0, 1)))
    assert torch.equal(image[2], grid[2]) and torch.equal(image[:, 4], grid[:, 4])  # partial patches stay


@pytest.mark.parametrize("grid,before,after", LAYOUTS)
def test_reference_matches_the_dense_oracle(grid, before, after):
    layout = layout_of(grid, before, after)
    modes = [pool_mode(2), MODE_FULL, pool_mode(3), 0, pool_mode(4), tile_mode(0, 0, 0)]
    q, k, v = inputs(layout, len(modes), seed=sum(grid) + before)
    out, lse = ops.headwise_attention(q, k, v, ops.mode_tensor(modes, "cpu"), segments=layout, impl="reference",
                                      return_lse=True)
    want, want_lse = dense_attention(q, k, v, modes, layout)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-6)
    # float64 in, float64 out: the reference is the oracle up to summation order
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out64 = ops.headwise_attention(q64, k64, v64, ops.mode_tensor(modes, "cpu"), segments=layout, impl="reference")
    torch.testing.assert_close(out64, want, atol=1e-12, rtol=1e-12)


def test_fused_pool_heads_are_named_by_their_slots():
    # The split of the GPU kernels' dispatch: a factor that divides the
    # grid's rows and cols runs in the kernel, each head named by its slot of the patch-mean buffer
    # (test_triton_kernel.py checks the buffer); the others run on SDPA, skipped in the kernel.
    from ditfastattn.ops import _pool_split

    grid = (2, 12, 8)  # 2 and 4 divide 12 and 8; 3 does not divide 8
    modes = (pool_mode(4), MODE_FULL, pool_mode(2), pool_mode(3), pool_mode(4), MODE_SKIP, 1)
    sdpa, kernel_values, idle, fused = _pool_split(modes, grid)
    assert sdpa == ((pool_mode(3), (3,)),) and fused == ((4, (0, 4)), (2, (2,))) and not idle
    slots = {head: (mode - POOL_FLAG) >> POOL_SLOT_SHIFT for head, mode in enumerate(kernel_values)
             if is_pool_mode(mode)}
    assert slots == {0: 0, 4: 1, 2: 2}
    assert all(kernel_values[head] & ((1 << POOL_SLOT_SHIFT) - 1) == pool_factor(modes[head]) for head in slots)
    assert kernel_values[3] == MODE_SKIP and [kernel_values[h] for h in (1, 5, 6)] == [MODE_FULL, MODE_SKIP, 1]
    # without a grid none is fused
    assert _pool_split(modes, None)[3] == () and not any(is_pool_mode(m) for m in _pool_split(modes, None)[1])


# Compiled in a fresh process: other tests load the Triton kernels under the interpreter, which
# compiles nothing.
_BUILD = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ditfastattn.ops import _pool_means, _triton


def build(fn, pointers, constexprs, options=None, aligned=()):
    # aligned: the arguments the JIT would find 16-aligned (pointers) or divisible by 16 (ints).
    names = list(fn.arg_names)
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in names}
    fixed = {(names.index(name),): value for name, value in constexprs.items()}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    target = GPUTarget("cuda", int(sys.argv[1]), 32)
    return triton.compile(ASTSource(fn, signature, fixed, attrs), target=target, options=options or {})


bf16 = dict.fromkeys(("Q", "K", "V", "O", "POOL_KV", "q_desc", "k_desc", "v_desc"), "*bf16")
pointers = {**bf16, "LSE": "*fp32", "qk_scale": "fp32", **dict.fromkeys(("MODES", "PAD", "QPAD", "PAD_BIAS"), "*i32")}
meta = dict(HEADS_POW2=32, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, IMAGE_BLOCK=128, USE_TMA=False, RETURN_LSE=True,
            HAS_PAD=False, INTERPRET=False, TILED=False, RAGGED=False, TILE_T=1, TILE_H=1, TILE_W=1,
            GLOBAL_ROWS=True, POOL=True, sqd=1, skd=1, svd=1, sod=1)
# Contiguous (B, S, H, D) inputs: what the JIT specialises on. The patch-mean buffer's strides are
# not specialised (do_not_specialize), so they get no alignment here either.
strides = ["s" + tensor + dim for tensor in "qkvo" for dim in "bsh"]
aligned = [*(name for name in pointers if pointers[name].startswith("*")), *strides]
kernel = build(_triton._headwise_kernel, pointers, meta, {"num_warps": 8, "num_stages": 3}, aligned)
means = build(_pool_means._means_kernel, {"K": "*bf16", "V": "*bf16", "OUT": "*bf16", "HEADS": "*i32", "MODES": "*i32"},
              dict(FACTOR=4, BLOCK_P=32, HEAD_DIM=128, INTERPRET=False, CHECK_MODES=True))
print("ld.global" in kernel.asm["ptx"], "st.global" in means.asm["ptx"], kernel.asm["ptx"].count("ld.global.b16"))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_fused_pool_paths_build_for_the_gpu(arch):
    # The CPU tests run the Triton kernels in the interpreter, which compiles nothing: the fused pool
    # path of the Triton kernel and the patch-mean kernel must also build for Ampere and Hopper, and
    # the kernel's pointer loads (the pool heads' patch means among them) must move 16 bytes at a
    # time, not one bf16 scalar (they did, unpipelined, before the buffer's strides came in units
    # of 16 elements: pool heads at 0.40-0.53 of their ideal speed-up on an H100, 0.53-0.77 since).
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    source = str(Path(ditfastattn.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", _BUILD, str(arch)], capture_output=True, text=True, env=env)
    if run.returncode and "ptxas" in run.stderr.lower():
        pytest.skip(f"cannot assemble here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True", "0"]


def test_kernel_modes_and_slot_heads_are_made_once_per_plan_row():
    # A plan row's kernel modes and its slots' heads reach the device once, not at every call (a copy
    # from the host waits for the GPU), and are made again when the row's tensor or the grid (which
    # heads fuse) changes.
    from ditfastattn.ops import _kernel_modes, _pool_split

    modes = (pool_mode(4), MODE_FULL, pool_mode(2), pool_mode(4))
    row = ops.mode_tensor(modes, "cpu")
    _, values, _, fused = _pool_split(modes, (1, 8, 8))
    first, heads = _kernel_modes(row, values, fused)
    assert heads.tolist() == [0, 3, 2] and first.tolist() == list(values)
    for other in range(300):  # other rows in between
        other_modes = (other, pool_mode(2))
        _kernel_modes(ops.mode_tensor(other_modes, "cpu"), *_pool_split(other_modes, (1, 8, 8))[1::2])
    again, heads_again = _kernel_modes(row, values, fused)
    assert again is first and heads_again is heads
    # on a grid that p = 4 leaves partial patches in, those heads run on SDPA: skipped in the kernel
    _, ragged_values, _, ragged_fused = _pool_split(modes, (1, 8, 6))
    ragged, ragged_heads = _kernel_modes(row, ragged_values, ragged_fused)
    assert ragged.tolist() == list(ragged_values) and ragged[0] == MODE_SKIP and ragged_heads.tolist() == [2]
    row[1] = 3  # an edited row is read anew
    _, values, _, fused = _pool_split(tuple(row.tolist()), (1, 8, 8))
    edited, _ = _kernel_modes(row, values, fused)
    assert edited is not first and edited[1] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits exist on a GPU only")
def test_a_pool_rows_first_call_does_not_wait_for_the_gpu():
    # A plan's rows first run mid-step; making their kernel modes and slot heads there must queue
    # the copies, not wait for the GPU (10 ms a step at FLUX 1024² when they did).
    layout = layout_of((1, 16, 16), 64, 0)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in inputs(layout, 4, dim=128))
    values = (pool_mode(2), MODE_FULL, pool_mode(4), 0)
    call = dict(segments=layout, out=torch.empty_like(q))
    ops.headwise_attention(q, k, v, ops.mode_tensor(values, "cuda"), **call)  # compiles, caches the split
    row = ops.mode_tensor(values, "cuda")  # a new row: its kernel modes are made at its first call
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.headwise_attention(q, k, v, row, **call)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = ops.headwise_attention(*(t.float().cpu() for t in (q, k, v)), row.cpu(), impl="reference", segments=layout)
    torch.testing.assert_close(call["out"].float().cpu(), want, atol=2e-2, rtol=2e-2)


def test_a_factor_above_the_grid_is_full_attention():
    layout = layout_of((1, 2, 3), 6, 0)  # no whole 4 x 4 patch: every image key stays its own
    q, k, v = twin_heads(layout)
    modes = ops.mode_tensor([pool_mode(4), MODE_FULL], "cpu")
    out = ops.headwise_attention(q, k, v, modes, segments=layout, impl="reference")
    torch.testing.assert_close(out[:, :, 0], out[:, :, 1], atol=1e-6, rtol=1e-6)


def test_pool_heads_are_pooled_attention_not_full_attention():
    # the patch means change what image queries see; global queries see every key as full heads do
    layout = layout_of((1, 6, 6), 5, 0)
    q, k, v = twin_heads(layout)
    out = ops.headwise_attention(q, k, v, ops.mode_tensor([pool_mode(2), MODE_FULL], "cpu"), segments=layout,
                                 impl="reference")
    torch.testing.assert_close(out[:, :5, 0], out[:, :5, 1], atol=1e-6, rtol=1e-6)
    assert (out[:, 5:, 0] - out[:, 5:, 1]).abs().max() > 1e-2


def test_global_rows_false_leaves_the_pool_heads_global_rows():
    layout = layout_of((1, 6, 6), 5, 3)
    q, k, v = inputs(layout, 2)
    out = torch.full_like(q, float("nan"))
    ops.headwise_attention(q, k, v, ops.mode_tensor([pool_mode(2), MODE_FULL], "cpu"), segments=layout, out=out,
                           impl="reference", global_rows=False)
    assert bool(out[:, :5, 0].isnan().all() and out[:, -3:, 0].isnan().all())
    assert bool(out[:, 5:-3, 0].isfinite().all() and out[:, :, 1].isfinite().all())


def test_pool_heads_need_a_grid_and_take_no_padding():
    layout = layout_of((1, 6, 6), 5, 0)
    q, k, v = inputs(layout, 2)
    modes = ops.mode_tensor([pool_mode(2), MODE_FULL], "cpu")
    with pytest.raises(ValueError, match=r"heads \[0\] run pooled keys, which need the image grid"):
        ops.headwise_attention(q, k, v, modes, text_start=0, text_len=5, impl="reference")
    mask = torch.zeros(q.shape[0], q.shape[1], dtype=torch.bool)
    mask[:, 4] = True
    with pytest.raises(ValueError, match="take no key padding"):
        ops.headwise_attention(q, k, v, modes, segments=layout, key_padding=mask, impl="reference")


# --- pool plans through the runtime and the search ------------------------------------------------

def pool_plan(transformer) -> Plan:
    methods = ["pool:2", "full", "pool:3", "cache", "arrow:0.5", "pool:5"]
    return with_methods(Plan.uniform(transformer, STEPS, "full"),
                        lambda step, layer, head: methods[(head + layer + step) % len(methods)])


@pytest.mark.parametrize("make", [flux_pipeline, sd3_pipeline], ids=["flux", "sd3"])
def test_a_pool_plan_follows_its_definition_and_remove_restores(make, recorder):
    pipe = make()
    stock = run_pipeline(pipe, steps=STEPS, **ODD)
    plan = pool_plan(pipe.transformer)
    ditfastattn.apply(pipe, plan)
    pooled = run_pipeline(pipe, steps=STEPS, **ODD)
    assert bool(torch.isfinite(pooled).all()) and not torch.equal(pooled, stock)
    assert len({"pool:2", "pool:3", "pool:5"} & check_heads(plan, recorder)) >= 2
    ditfastattn.remove(pipe)
    assert torch.equal(run_pipeline(pipe, steps=STEPS, **ODD), stock)


def test_pool_factors_that_leave_partial_patches_are_said_once(caplog):
    # Their heads run on SDPA beside the kernel (slower, not wrong): said once per grid, naming only the
    # factors that leave partial patches (24 x 28 patches: 2 divides both, 3 and 5 do not).
    pipe = flux_pipeline()
    ditfastattn.apply(pipe, pool_plan(pipe.transformer))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        run_pipeline(pipe, steps=STEPS, **ODD)
        run_pipeline(pipe, steps=STEPS, **ODD)
    said = [r.getMessage() for r in caplog.records if "partial patches" in r.getMessage()]
    assert len(said) == 1 and "24 x 28" in said[0] and "pool:3, pool:5" in said[0] and "pool:2" not in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ditfastattn"):
        run_pipeline(pipe, steps=STEPS, height=48, width=48)  # 24 x 24: 2 and 3 divide it, 5 does not
    said = [r.getMessage() for r in caplog.records if "partial patches" in r.getMessage()]
    assert len(said) == 1 and "24 x 24" in said[0] and "pool:5" in said[0] and "pool:3" not in said[0]
    ditfastattn.remove(pipe)


def test_a_pool_plan_on_kontext_sees_the_reference_image_whole(recorder):
    # FLUX.1 Kontext: text, the image (its grid), then the reference image, a global segment that
    # pool heads' image queries see in full
    pipe = MiniPipeline(IMAGE_FAMILIES["flux-kontext"])
    plan = pool_plan(pipe.transformer)
    ditfastattn.apply(pipe, plan)
    assert bool(torch.isfinite(generate(pipe)).all())
    assert all(len(record["layout"].segments) == 2 and record["layout"].grid for record in recorder)
    assert len({"pool:2", "pool:3", "pool:5"} & check_heads(plan, recorder)) >= 2
    ditfastattn.remove(pipe)


def test_pool_plans_on_video_pool_each_frame_and_refuse_text_masks(recorder):
    # Wan's self-attention: the video alone, a grid of frames; each frame's patches pool on their own
    pipe = MiniPipeline(VIDEO_FAMILIES["wan"])
    methods = {1: ("pool:2", "full"), 2: ("cache", "pool:3")}  # per step, per head
    plan = with_methods(Plan.uniform(pipe.transformer, STEPS, "full"), lambda step, layer, head: methods[step][head])
    ditfastattn.apply(pipe, plan)
    assert bool(torch.isfinite(generate(pipe)).all())
    assert {record["layout"].grid for record in recorder} == {VIDEO_GRID} and VIDEO_GRID[0] > 1
    assert check_heads(plan, recorder) == {"full", "pool:2", "pool:3"}
    ditfastattn.remove(pipe)
    # HunyuanVideo masks its text: a patch mean must not mix padding in, so pool plans (static mode's
    # too) and pool candidates are refused at the first call (step 0, all full), before any step runs them
    recorder.clear()
    pipe = MiniPipeline(VIDEO_FAMILIES["hunyuanvideo"])
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "pool:2"))
    with pytest.raises(ValueError, match=r"pooled keys \(pool:2\) take no key padding, but .* without pool: methods"):
        generate(pipe)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "pool:2"), static=True,
                      num_image_tokens=math.prod(VIDEO_GRID))
    with pytest.raises(ValueError, match=r"pooled keys \(pool:2\) take no key padding, but .* without pool: methods"):
        generate(pipe)
    assert not [name for name, _ in pipe.transformer.named_buffers() if name.endswith("_ditfastattn_modes")]
    ditfastattn.remove(pipe)
    search = SearchConfig(num_inference_steps=STEPS, delta=1.0, candidates=("full", "arrow:0.5", "pool:2"))
    with pytest.raises(ValueError, match=r"pooled keys \(pool:2\) take no key padding"):
        ditfastattn.calibrate(pipe, [prompt(seed=1)], search, progress=False)
    assert len(calls) == 3 and not recorder  # one call each (dynamic, static, calibrate), no layer computed


# Per (step, layer, head): each head pools at some steps, with either factor, and runs others at the rest.
STATIC_POOLED = ["pool:2", "cache", "pool:4", "arrow:0.5", "full", "pool:2", "arrow_residual:0.5"]


@torch.no_grad()
def test_static_mode_runs_pool_plans_as_the_dynamic_runtime_compiled():
    # One patch-mean buffer a layer serves every step: its slots hold every head that pools at some
    # step, and the mode tables name pool heads by them (no host read in a compiled step).
    model = tiny_flux()  # 1 x 20 x 24 patches: 2 and 4 divide both
    plan = with_methods(Plan.uniform(model, static_tests.STEPS, "full", num_image_tokens=20 * 24),
                        lambda step, layer, head: STATIC_POOLED[(3 * head + layer + step) % len(STATIC_POOLED)])
    assert {"pool:2", "pool:4"} <= {m for rows in plan.methods for heads in rows for m in heads}
    static_tests.static_matches_dynamic(model, plan, static_tests.flux_inputs(), 20 * 24, compiled=True)


@torch.no_grad()
def test_static_mode_refuses_pool_factors_that_leave_partial_patches():
    # Their edge tokens run on SDPA, which reads the modes on the host: refused at the first call,
    # before any layer built its tables.
    model = tiny_flux()
    plan = Plan.uniform(model, static_tests.STEPS, "pool:3", num_image_tokens=20 * 24)  # 3 does not divide 20
    stock = model(**static_tests.flux_inputs(), timestep=torch.tensor([static_tests.TIMESTEPS[0]])).sample
    ditfastattn.apply(model, plan, static=True)
    with pytest.raises(NotImplementedError, match=r"\(20 x 24\); pool:3 does not .* apply without static=True"):
        model(**static_tests.flux_inputs(), timestep=torch.tensor([static_tests.TIMESTEPS[0]]))
    assert not [name for name, _ in model.named_buffers() if name.endswith("_ditfastattn_modes")]
    ditfastattn.remove(model)
    assert torch.equal(model(**static_tests.flux_inputs(), timestep=torch.tensor([static_tests.TIMESTEPS[0]])).sample,
                       stock)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_search_with_pool_candidates_replays_bit_for_bit(kind, recorder):
    plan = search_and_replay(kind, ("full", "cache", "arrow:0.25", "pool:2", "pool:4"), recorder)
    assert methods_of(plan) & {"pool:2", "pool:4"}


def test_measured_costs_steer_the_recommended_search_and_survive_its_forced_passes():
    # cache="auto" and sensitivity="measure" run forced passes (probes, the uncompressed one) with
    # other candidates; costs naming the searched ones must not stop them (they raised before).
    # Pool heads priced at a full head's cost are never worth their error; at their FLOPs they are
    # (here in the per-step search's windows: which of the two searches cache="auto" keeps is the
    # final error's call, not the prices').
    pipe = flux_pipeline()
    search = config("flux", delta=0.5, candidates=("full", "cache", "arrow:0.25", "pool:2"), target_sparsity=0.5,
                    budget="generation", head_coefficient=None, sensitivity="measure", cache="auto")
    priced = ditfastattn.calibrate(pipe, prompts("flux"), dataclasses.replace(search, costs={"pool:2": 1.0}),
                                   progress=False)
    assert "pool:2" not in methods_of(priced)
    by_step = dataclasses.replace(search, cache="step")
    assert "pool:2" in methods_of(ditfastattn.calibrate(pipe, prompts("flux"), by_step, progress=False))


# --- attention candidates scored on part of the batch ---------------------------------------------

def test_candidate_scores_take_the_batch_in_turns():
    from ditfastattn._calibration_session import SCORE_STRIDE, score_sample

    assert score_sample(1, 0) is None and score_sample(3, 5) is None  # a single element would be the whole estimate
    for batch in (4, 5, 8, 16, 24):
        stride = min(SCORE_STRIDE, batch // 2)
        turns = [list(range(batch))[score_sample(batch, turn)] for turn in range(stride)]
        assert all(len(sample) >= 2 for sample in turns)
        assert sorted(sum(turns, [])) == list(range(batch))  # each element once in ``stride`` layer-steps
        assert list(range(batch))[score_sample(batch, stride + 1)] == turns[1]
    for turn in range(SCORE_STRIDE):  # 8 prompts under CFG: a sampled prompt brings its other half
        sample = set(list(range(16))[score_sample(16, turn)])
        assert {i + 8 for i in sample if i < 8} == {i for i in sample if i >= 8}


def test_sampled_errors_are_exact_where_errors_follow_the_variance():
    # Prompts whose outputs and errors differ only in scale: the ratio estimate from two of eight
    # elements is the batch's error, where scaling by their count would be off by the scales' spread.
    from ditfastattn._calibration_session import sampled_errors, score_sample

    gen = torch.Generator().manual_seed(3)
    exact, out = torch.randn(2, 1, 40, 3, 8, generator=gen)
    exact = exact - exact.mean(dim=(1, 3), keepdim=True)  # zero mean per head: each element's variance scales
    scales = torch.tensor([0.5, 3.0, 1.0, 0.2, 2.0, 1.5, 0.7, 4.0]).view(-1, 1, 1, 1)
    exact, out = exact * scales, (exact + 0.1 * out) * scales
    whole = ops.head_squared_errors(out, exact)
    for turn in range(4):
        sample = score_sample(8, turn)
        part = exact[sample]
        estimate = sampled_errors(ops.head_squared_errors(out[sample], part), ops.head_variances(exact),
                                  ops.head_variances(part))
        torch.testing.assert_close(estimate, whole, rtol=1e-5, atol=0)
        by_count = ops.head_squared_errors(out[sample], part) * 4
        assert not torch.allclose(by_count, whole, rtol=0.05)


def test_the_search_runs_attention_candidates_on_part_of_the_batch_and_sharing_on_all(monkeypatch):
    pipe = make_pipeline("sd3")
    batches = set()
    real = ops.headwise_attention

    def spy(q, k, v, head_modes, **kwargs):
        if kwargs.get("global_rows") is False:  # a candidate scored (the runtime's rows write every row)
            batches.add(q.shape[0])
        return real(q, k, v, head_modes, **kwargs)

    monkeypatch.setattr(ops, "headwise_attention", spy)
    plan = ditfastattn.calibrate(pipe, prompts("sd3", 4),
                                 config("sd3", delta=0.5, candidates=("full", "cache", "arrow:0.25", "pool:2"),
                                        sensitivity=None), progress=False)
    assert batches == {2}  # 4 prompts under CFG: one prompt's pair a layer-step
    assert "pool:2" in methods_of(plan) and "arrow:0.25" in methods_of(plan)

    # Residual and CFG sharing read every element's residual or both CFG halves: the whole batch,
    # for the plain arrow of the same window too (one attention serves all three).
    batches.clear()
    ditfastattn.calibrate(pipe, prompts("sd3", 4),
                          config("sd3", delta=0.5, candidates=("full", "arrow:0.25", "arrow_residual:0.25",
                                                                "cfg_share+arrow:0.25"),
                                 sensitivity=None), progress=False)
    assert batches == {8}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")
@pytest.mark.parametrize("impl", ["triton", "gluon"])
def test_candidates_on_a_strided_part_of_the_batch_match_a_copy(impl):
    # The search scores candidates on every fourth batch element as a view (no copy): the kernel
    # must give what it gives on a contiguous copy, arrows and pool heads, text first or last, and
    # a key-padding mask sliced with the batch.
    if impl == "gluon" and (ops.gluon_available() or torch.cuda.get_device_capability()[0] != 9):
        pytest.skip("the Gluon kernel runs on Hopper")
    check_strided_parts_match_copies(impl, "cuda", torch.bfloat16, dim=128)


def check_strided_parts_match_copies(impl: str, device: str, dtype, dim: int) -> None:
    grid, text = (1, 32, 32), 77
    for before, after in ((text, 0), (0, text)):
        layout = layout_of(grid, before, after)
        q, k, v = (t.to(device, dtype) for t in inputs(layout, 4, batch=8, dim=dim))
        image = slice(before, before + layout.image_len)
        padding = None
        if before:  # text first, its tail padded to a length of each element's own (Qwen-Image)
            padding = torch.zeros(8, layout.seq_len, dtype=torch.bool, device=device)
            for element in range(8):
                padding[element, before - 3 * (element + 1): before] = True
        for mode in (window_blocks(0.125, layout.image_len), window_blocks(0.03125, layout.image_len), pool_mode(2)):
            mask = None if is_pool_mode(mode) else padding  # pool heads take no key padding
            for part in (slice(0, 8, 4), slice(3, 8, 4)):
                def run(tensors, key_mask):
                    extra = {} if key_mask is None else {"key_padding": ops.Padding(key_mask)}
                    return ops.headwise_attention(*tensors, ops.mode_tensor([mode] * 4, device), segments=layout,
                                                  impl=impl, global_rows=False, **extra)
                view = run((q[part], k[part], v[part]), None if mask is None else mask[part])
                copy = run([t[part].contiguous() for t in (q, k, v)], None if mask is None else mask[part].contiguous())
                assert torch.equal(view[:, image], copy[:, image])
