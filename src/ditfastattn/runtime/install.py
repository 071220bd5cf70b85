"""Install and remove: ``apply`` / ``remove``, the hooks, and the family's way in (processors or
the dispatch interception)."""

from __future__ import annotations

import math
import numbers

import torch

from .. import ops
from ..adapters import adapter_for, check_cfg_sharing, dispatch
from ..plan import Plan, _is_int
from . import parallel
from .session import Session, experts_of, logger
from .static import StaticSession, refuse_static_caches

_SESSION_ATTR = "_ditfastattn_session"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _transformer_of(pipe_or_transformer):
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer, None
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, pipe_or_transformer
    raise TypeError(
        f"expected a diffusers pipeline with a `.transformer` or a transformer module; got {type(pipe_or_transformer).__name__}"
    )


def install(pipe_or_transformer, plan: Plan, impl: str, session_cls=Session, **session_args) -> Session:
    transformer, pipe = _transformer_of(pipe_or_transformer)
    experts = experts_of(transformer, pipe)
    if any(getattr(expert, _SESSION_ATTR, None) is not None for expert in experts):
        raise RuntimeError("a ditfastattn plan is already applied to this model; call ditfastattn.remove() first")
    if impl not in ops.IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {ops.IMPLEMENTATIONS}; got {impl!r}")
    if not isinstance(plan, Plan):
        raise TypeError(f"expected a ditfastattn.Plan (e.g. Plan.load(path)); got {type(plan).__name__}")
    adapter = adapter_for(transformer, context_parallel=getattr(session_cls, "context_parallel", False))
    spec = adapter.describe(transformer)
    plan.check_compatible(spec)
    switches = plan.provenance.get("expert_switch_steps")
    if pipe is None and switches:
        # On one expert alone the steps count from its own first call, which for transformer_2 is the
        # switch step: the rows would run at the wrong steps.
        raise ValueError(
            f"this plan was searched over a pipeline's two experts (the second from step {switches[0]}), and its rows "
            "follow the pipeline's steps, which a transformer alone cannot see: apply it to the pipeline "
            "(ditfastattn.apply(pipe, plan))"
        )
    if len(experts) > 1:
        _check_second_expert(experts[1], transformer, spec, adapter)
    check_cfg_sharing(adapter, {m for rows in plan.methods for heads in rows for m in heads}, pipe)
    stock = adapter.stock_processor_types()
    modules = [{name: expert.get_submodule(name) for name in plan.layer_names} for expert in experts]
    for index, expert_modules in enumerate(modules):
        for name, module in expert_modules.items():
            if not isinstance(module.processor, stock):
                raise TypeError(
                    f"{_module_name(index, name)} uses {type(module.processor).__name__}; ditfastattn works with "
                    f"diffusers' stock {', '.join(t.__name__ for t in stock)} only (undo fuse_qkv_projections / "
                    "custom processors first)"
                )
    session = session_cls(transformer, plan, adapter, impl, **session_args)
    try:
        _hook(session, experts, modules, pipe)
    except BaseException:  # an interrupt too: nothing of a plan that is not applied may stay on the model
        _unhook(session)
        raise
    for expert in experts:
        setattr(expert, _SESSION_ATTR, session)
    return session


def _hook(session: Session, experts, modules, pipe) -> None:
    """Put ``session`` on the model: its counters, hooks, processors or dispatch, and the scheduler."""
    adapter = session.adapter
    session.set_experts(experts)
    session.install_layers(modules[0])
    for expert in experts:
        session.handles.append(expert.register_forward_pre_hook(session.begin_call, with_kwargs=True))
        session.handles.append(expert.register_forward_hook(session.end_call, with_kwargs=True))
    if hasattr(adapter, "make_processor"):  # a family that calls SDPA itself: its own processors
        for expert_modules in modules:
            for layer in session.layers:
                module = expert_modules[layer.name]
                session.originals.append((module, module.processor))
                module.set_processor(adapter.make_processor(layer, module.processor))
    else:
        dispatch.intercept(session, modules)
    session.watch_processors([(_module_name(index, name), module) for index, expert_modules in enumerate(modules)
                              for name, module in expert_modules.items()], exact=hasattr(adapter, "make_processor"))
    if pipe is not None:
        session.pipe = pipe
        session.follow_scheduler(check=False)  # its timesteps may be a previous run's


def _unhook(session: Session) -> None:
    """Undo :func:`_hook`, as far as it went."""
    for module, processor in session.originals:
        module.set_processor(processor)
    for handle in session.handles:
        handle.remove()
    release = getattr(session, "release", None)  # set where dispatch.intercept wrapped the stock function
    if release is not None:
        release()
    if session.scheduler_hook is not None:
        session.scheduler_hook.undo()
    for layer in session.layers:
        layer.free()
    try:
        session.uninstall_layers({layer.name: session.transformer.get_submodule(layer.name) for layer in session.layers})
    finally:  # a model whose session stays could be neither applied to nor removed from again
        for expert in session.experts:
            if getattr(expert, _SESSION_ATTR, None) is session:
                delattr(expert, _SESSION_ATTR)


def _module_name(expert: int, name: str) -> str:
    """A layer's name as errors show it: the second expert's prefixed with ``transformer_2.``."""
    return name if expert == 0 else f"transformer_2.{name}"


def _check_second_expert(expert, transformer, spec, adapter) -> None:
    """A second expert runs the same plan rows at its own steps: it must be the same model, under
    parallelism where the first is (the Ulysses session compares their groups)."""
    specs = spec, adapter.describe(expert)
    patches = [getattr(getattr(model, "config", None), "patch_size", None) for model in (transformer, expert)]
    if type(expert) is not type(transformer):
        differs = f"{type(expert).__name__} against {type(transformer).__name__}"
    elif len(specs[0].layers) != len(specs[1].layers):
        differs = f"{len(specs[1].layers)} attention layers against {len(specs[0].layers)}"
    elif specs[0] != specs[1]:
        differs = "attention layers of other head counts or sizes"
    elif patches[0] != patches[1]:  # the token grid both experts' calls are laid out on
        differs = f"patch size {patches[1]} against {patches[0]}"
    else:
        differs = None
    if differs:
        raise ValueError(
            f"pipe.transformer_2 is not the same model as pipe.transformer ({differs}); ditfastattn runs one plan "
            "on both experts, so they must match (a plan applied to pipe.transformer alone leaves transformer_2 stock)"
        )
    parallel_on = [parallel.context_parallel(model) for model in (transformer, expert)]
    if parallel_on[0] != parallel_on[1]:
        on, off = ("pipe.transformer", "pipe.transformer_2") if parallel_on[0] else ("pipe.transformer_2",
                                                                                   "pipe.transformer")
        raise ValueError(
            f"diffusers' parallelism is enabled on {on} but not on {off}; one plan runs on both experts, so enable "
            "it on both (each its own enable_parallelism(config=ContextParallelConfig(ulysses_degree=N)), the same "
            "N), or on neither"
        )


def applied(pipe_or_transformer) -> bool:
    """Whether a plan is applied to the model (to either expert of a pipeline)."""
    transformer, pipe = _transformer_of(pipe_or_transformer)
    return any(getattr(expert, _SESSION_ATTR, None) is not None for expert in experts_of(transformer, pipe))


def uninstall(pipe_or_transformer) -> Plan:
    transformer, pipe = _transformer_of(pipe_or_transformer)
    session: Session | None = getattr(transformer, _SESSION_ATTR, None)
    if session is None and pipe is not None:  # a plan applied to transformer_2 alone
        session = getattr(getattr(pipe, "transformer_2", None), _SESSION_ATTR, None)
    if session is None and pipe is not None:  # pipe.transformer replaced since apply: its scheduler knows the session
        hooked = getattr(getattr(getattr(pipe, "scheduler", None), "set_timesteps", None), "ditfastattn_session", None)
        session = hooked if hooked is not None and hooked.pipe is pipe and hooked.scheduler_hook.active else None
    if session is None:
        raise RuntimeError("no ditfastattn plan is applied to this model; nothing to remove")
    _unhook(session)
    return session.applied_plan


def apply(
    pipe_or_transformer,
    plan: Plan,
    *,
    impl: str = "auto",
    cache_budget_gib: float | None = None,
    static: bool = False,
    num_image_tokens: int | None = None,
    balance_heads: bool = False,
) -> None:
    """Run ``pipe_or_transformer`` under ``plan`` until :func:`remove`.

    Takes over the attention of every layer the plan names (for the families that call diffusers'
    ``dispatch_attention_fn``, by intercepting that call; SD3 through processors of its own, per
    module instance), tracks the denoising step from the transformer's ``timestep``, and, given a
    pipeline, checks the step count whenever the scheduler's timesteps are set (a scheduler
    swapped in later included). More steps than the plan always raise; on the transformer alone, a
    generation that stopped short is logged when the next one starts. ``impl`` picks the attention
    op ("auto", "gluon", "triton", "reference"; see :func:`ditfastattn.ops.headwise_attention`).

    A pipeline that hands the low-noise steps to a second expert of the same architecture (Wan 2.2
    A14B's ``transformer_2``) runs the plan on both, each expert at its own steps; a head never
    reads the other expert's outputs, so at an expert's first step its ``cache`` heads compute. A
    calibrated plan records the step the second expert took over at; a generation whose expert
    takes over at another step, or at none (another ``boundary_ratio`` or scheduler shift), is
    logged once. Changing the experts after ``apply`` (``transformer_2``, or ``boundary_ratio``
    to or from None) is refused at the next generation.
    Static mode follows both experts too (the step counter is a buffer of each, so each expert's
    compiled graph advances it); the switch-step log is the dynamic runtime's only.

    Cache heads read their layer's output of the previous step, which the runtime keeps only while
    the next step caches, per transformer call of a step. A call that did not run at the previous
    step (skip-layer guidance starts mid-generation) computes its cache heads instead, and its
    ``arrow_residual`` heads where it kept no residual: exact, never a read of memory nothing
    wrote. ``cache_budget_gib`` bounds those buffers (all call slots together): where
    the plan would need more, the fewest cached heads per byte compute (``full``) instead, logged
    once with the count. ``None`` keeps every buffer the plan needs.

    ``static=True`` keeps the step counter and the per-step head modes on the device, so
    ``torch.compile(transformer, fullgraph=True)`` compiles one graph for every step and CUDA
    graphs can replay it. It needs the image token count (``num_image_tokens``, or the plan's
    provenance), no ``cfg_share``, and one uncompiled step (every call of it) to build its tables
    and buffers. Several transformer calls per step (true CFG as a second call, skip-layer
    guidance) keep apart as in the dynamic runtime, with the call's index on the device too; a
    compiled or replayed step that calls more often than the eager ones did is reported at the next
    eager call or generation. Layers that are full at every step run the stock attention; the
    others run every head through the fused op, and keep an output buffer per call for the whole
    generation if they ever cache. Tile windows are sized for the image grid of the first call,
    which must report one, and shapes stay those of the eager calls.

    Under diffusers' Ulysses context parallelism (``transformer.enable_parallelism(config=
    ContextParallelConfig(ulysses_degree=N))`` first, then ``apply`` on every rank), each rank runs
    its own heads' methods over the whole sequence and keeps only their buffers
    (``cache_budget_gib`` is per rank); every rank must pass the same plan and settings (refused on
    every rank where one differs). ``balance_heads=True`` then reorders each layer's heads
    (the q/k/v and output projections, and the plan) so that the ranks' per-step costs are even,
    and logs the imbalance before and after (every layer's: ``ditfastattn.placement.place_heads``;
    it sizes costs at ``num_image_tokens`` or the plan's resolution); ``remove()`` restores the
    weights (a LoRA loaded or projections fused meanwhile are refused at the next generation).
    With a second expert, enable parallelism on each (its own ``enable_parallelism``, the same
    ``ulysses_degree`` and mesh layout): each expert's calls trade over its own process group,
    and ``balance_heads`` reorders both alike; parallelism on one expert only, or groups that split
    the heads otherwise, are refused. Ring attention, tensor parallelism and ``static=True`` under
    parallelism are refused.
    """
    transformer, pipe = _transformer_of(pipe_or_transformer)
    experts = experts_of(transformer, pipe)
    # parallelism on either expert picks the Ulysses session, whose install refuses it on one only
    parallel_on = any(map(parallel.context_parallel, experts))
    # Under Ulysses every rank runs its heads of one plan, placed alike: an argument refused, or one
    # that differs, on any rank is refused on every rank (one rank stopping alone leaves the others waiting).
    with parallel.ranks_agree(transformer, "ditfastattn.apply") as shared:
        if impl not in ops.IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {ops.IMPLEMENTATIONS}; got {impl!r}")
        if cache_budget_gib is not None and not (_is_number(cache_budget_gib) and _bytes(cache_budget_gib) is not None
                                                 and cache_budget_gib >= 0):
            raise ValueError(
                f"cache_budget_gib must be >= 0: a finite number of GiB, or None for no limit; got {cache_budget_gib!r}"
            )
        if num_image_tokens is not None and not (_is_int(num_image_tokens) and num_image_tokens > 0):
            raise ValueError(
                f"num_image_tokens must be a positive int (e.g. FLUX 1024x1024: 4096); got {num_image_tokens!r}")
        if not isinstance(static, bool):
            raise TypeError(f"static must be True or False; got {static!r}")
        if not isinstance(balance_heads, bool):
            raise TypeError(f"balance_heads must be True or False; got {balance_heads!r}")
        if parallel_on:
            running = ("grid", "tile", "num_image_tokens", "text_len", "expert_switch_steps", "head_order")
            shared.update(plan=repr((plan.model, plan.methods, {key: plan.provenance.get(key) for key in running}))
                          if isinstance(plan, Plan) else repr(type(plan)), impl=impl, balance_heads=balance_heads,
                          num_image_tokens=num_image_tokens, static=static)
    budget = None if cache_budget_gib is None else _bytes(cache_budget_gib)
    if parallel_on:
        install(pipe_or_transformer, plan, impl, parallel.UlyssesSession, cache_budget=budget, static=static,
                balance_heads=balance_heads, num_image_tokens=num_image_tokens)
    elif balance_heads:
        raise ValueError("balance_heads=True evens the heads of Ulysses ranks; this transformer runs without context "
                         "parallelism (enable_parallelism(config=ContextParallelConfig(ulysses_degree=N)) first)")
    elif static:
        if not isinstance(plan, Plan):
            raise TypeError(f"expected a ditfastattn.Plan (e.g. Plan.load(path)); got {type(plan).__name__}")
        tokens = num_image_tokens or plan.provenance.get("num_image_tokens")
        if not tokens:
            raise ValueError("static=True needs num_image_tokens= (e.g. FLUX 1024x1024: 4096) or a plan that records it")
        refuse_static_caches(experts, pipe)
        install(pipe_or_transformer, plan, impl, StaticSession, cache_budget=budget, num_image_tokens=int(tokens))
    else:
        install(pipe_or_transformer, plan, impl, cache_budget=budget)
    logger.info("applied %s plan (%s)", plan.provenance.get("source", "calibrated"), plan)


def _bytes(gib) -> int | None:
    """``gib`` GiB in bytes, or None where that is no finite number (an int past float's range too)."""
    try:
        value = gib * 2**30
        return int(value) if math.isfinite(value) else None
    except OverflowError:
        return None


def remove(pipe_or_transformer) -> Plan:
    """Restore the model (bit for bit): its processors, diffusers' dispatch function, no hooks or
    buffers; returns the plan."""
    return uninstall(pipe_or_transformer)
