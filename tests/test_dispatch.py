"""The interception point of the dispatch families: diffusers' dispatch_attention_fn, wrapped while a
plan is applied, and the masks it reads."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import tiny_flux
from diffusers.models.transformers import transformer_flux
from test_static import flux_inputs

import ditfastattn
from ditfastattn import Plan, ops
from ditfastattn.model import TokenLayout
from ditfastattn.adapters import dispatch

STEPS = 3


def generate(model, inputs):
    with torch.no_grad():
        return [model(**inputs, timestep=torch.full((1,), t)).sample for t in (900.0, 500.0, 100.0)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_remove_puts_the_stock_function_back_and_other_models_run_stock():
    gc.collect()  # models other tests dropped with a plan applied release the function as they go
    stock_fn = transformer_flux.dispatch_attention_fn
    assert not hasattr(stock_fn, "__wrapped__")
    first, second = tiny_flux(seed=0), tiny_flux(seed=1)
    inputs = flux_inputs()
    first_stock, second_stock = generate(first, inputs), generate(second, inputs)
    ditfastattn.apply(first, Plan.uniform(first, STEPS, "arrow:0.3"))
    assert transformer_flux.dispatch_attention_fn is not stock_fn
    compressed = generate(first, inputs)
    assert not same(compressed, first_stock)
    assert same(generate(second, inputs), second_stock)  # same family, no plan: untouched
    ditfastattn.apply(second, Plan.uniform(second, STEPS, "cache"))
    ditfastattn.remove(first)  # the second plan still needs the wrapper
    assert transformer_flux.dispatch_attention_fn is not stock_fn
    assert not same(generate(second, inputs), second_stock)
    ditfastattn.remove(second)
    assert transformer_flux.dispatch_attention_fn is stock_fn
    assert same(generate(first, inputs), first_stock) and same(generate(second, inputs), second_stock)


def test_a_model_dropped_with_a_plan_applied_releases_the_function():
    gc.collect()
    stock_fn = transformer_flux.dispatch_attention_fn
    model = tiny_flux()
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "cache"))
    assert transformer_flux.dispatch_attention_fn is not stock_fn
    del model
    gc.collect()
    assert transformer_flux.dispatch_attention_fn is stock_fn


def test_a_wrapper_installed_on_top_stays_after_remove():
    model = tiny_flux()
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "full"))
    ours = transformer_flux.dispatch_attention_fn

    def theirs(*args, **kwargs):
        return ours(*args, **kwargs)

    transformer_flux.dispatch_attention_fn = theirs
    try:
        ditfastattn.remove(model)
        assert transformer_flux.dispatch_attention_fn is theirs
    finally:
        transformer_flux.dispatch_attention_fn = ours.__wrapped__


@pytest.mark.parametrize("form", ["(B, S)", "(B, 1, 1, S)", "pairs bool", "pairs float"])
def test_masks_become_the_padding_that_matches_sdpa(form):
    batch, seq = 2, 12
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[0, 3:5] = False
    keep[1, 7:] = False
    pairs = form.startswith("pairs")
    mask = {"(B, S)": keep, "(B, 1, 1, S)": keep[:, None, None, :],
            "pairs bool": keep[:, None, None, :] & keep[:, None, :, None],
            "pairs float": keep[:, None, None, :].float() * keep[:, None, :, None].float()}[form]
    session = type("Session", (), {"call_cache": {}})()
    padding, reason = dispatch.padding_of(mask, batch, seq, pairs, session)
    assert reason is None and torch.equal(padding.mask, ~keep)
    q, k, v = (torch.randn(batch, seq, 2, 8) for _ in range(3))
    sdpa_mask = mask[:, None, None, :] if mask.dim() == 2 else mask
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=sdpa_mask)
    got = ops.headwise_attention(q, k, v, torch.full((2,), -1, dtype=torch.int32), text_start=0, text_len=6,
                                 key_padding=padding)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=2e-6, rtol=1e-5)


def test_a_text_mask_on_a_grid_is_marked_global_only_once_per_call():
    """Where no image token is padded (a text's tail is), the padding says so, read once per mask per
    call; an image token padded, no grid (no tile windows), a pair table or an in-place write since
    the read leave it unmarked; so does a session without tile windows (no read)."""
    session = type("Session", (), {"call_cache": {}, "tile_windows": True})()
    image, text = 32, 8
    layout = TokenLayout(image + text, 0, image, (2, 4, 4))
    mask = torch.zeros(2, image + text, dtype=torch.bool)
    mask[:, image + 5 :] = True
    padding = ops.Padding(mask)
    marked = dispatch._global_only(padding, layout, session)
    assert marked.global_only and marked.mask is mask and marked.bias == padding.bias
    assert dispatch._global_only(padding, layout, session) is marked
    image_padded = mask.clone()
    image_padded[1, 3] = True
    assert not dispatch._global_only(ops.Padding(image_padded), layout, session).global_only
    assert not dispatch._global_only(padding, TokenLayout(image + text, 0, image), session).global_only
    assert not dispatch._global_only(ops.Padding(mask, ops.PAIR_PADDING), layout, session).global_only
    mask[0, 0] = True
    assert not dispatch._global_only(padding, layout, session).global_only
    mask[0, 0] = False
    bands = type("Session", (), {"call_cache": {}, "tile_windows": False})()
    assert dispatch._global_only(padding, layout, bands) is padding and not bands.call_cache


def test_masks_the_op_cannot_express_are_named():
    batch, seq = 1, 6
    session = type("Session", (), {"call_cache": {}})()
    float_keys = torch.zeros(batch, 1, 1, seq)
    assert "ditfastattn reads boolean key masks)" in dispatch.padding_of(float_keys, batch, seq, False, session)[1]
    square = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
    assert dispatch.padding_of(square, batch, seq, False, session)[0] is None  # only pair-mask families
    weights = torch.full((batch, 1, seq, seq), 0.5)  # floats other than 0/1: not a token-pair mask
    assert "floats 0/1" in dispatch.padding_of(weights, batch, seq, True, session)[1]


def test_an_attention_mask_it_cannot_read_runs_stock_and_refuses_compression(monkeypatch):
    # FLUX pipelines pass no mask; a caller's float mask is added to the scores, which the op cannot do.
    model = tiny_flux()
    inputs = flux_inputs()
    mask = torch.zeros(1, 1, 1, 7 + 480)
    seen = []
    stock = dispatch._attend

    def spy(layer, stock_fn, query, key, value, args, kwargs):
        kwargs = {**kwargs, "attn_mask": mask}
        seen.append(layer.name)
        return stock(layer, stock_fn, query, key, value, args, kwargs)

    monkeypatch.setattr(dispatch, "_attend", spy)
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "full"))
    generate(model, inputs)  # all-full: the stock attention with the mask
    assert len(seen) == 3 * STEPS
    ditfastattn.remove(model)
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "arrow:0.3"))
    seen.clear()
    with pytest.raises(NotImplementedError, match=r"transformer_blocks.0.attn: an attention mask .*float32.*runs only "
                                                  r"the stock attention, but the plan compresses this layer at step 1"):
        generate(model, inputs)
    assert seen == ["transformer_blocks.0.attn"]  # at the first layer of step 0, not after that step's work
    ditfastattn.remove(model)
