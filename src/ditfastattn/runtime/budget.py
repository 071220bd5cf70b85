"""The memory budget: which cached head-steps compute instead, so the output buffers fit."""

from __future__ import annotations


def fit_cache_budget(
    cached: list[list[int]], layer_bytes: list[int], budget: int, *, static: bool = False, whole: frozenset[int] = frozenset()
):
    """Per layer, the steps whose ``cache`` heads run ``full`` instead, so the buffers they read fit ``budget`` bytes.

    A cache head at step t reads its layer's output of step t - 1, so the layer keeps that buffer
    across the step boundary. While step t runs, a layer holds a buffer if step t or step t + 1
    caches (layers run in order: those already run hold step t's output, the rest step t - 1's).
    Buffers are given up greedily where they save the fewest cached heads per byte. A static
    session holds a buffer for the whole generation if the layer ever caches.

    ``whole``: steps at which every head of every layer caches. Such a step gives way whole where
    any of its layers would: a step that mixes reused and fresh heads costs the output far more
    than either (``SearchConfig(cache="step")``).
    """
    dropped = _fit(cached, layer_bytes, budget, static)
    broken = {t for t in whole if any(t in steps for steps in dropped)}
    return [steps | frozenset(t for t in broken if cached[t][layer]) for layer, steps in enumerate(dropped)]


def _fit(cached: list[list[int]], layer_bytes: list[int], budget: int, static: bool) -> list[frozenset[int]]:
    steps, layers = len(cached), len(layer_bytes)

    def value(layer, step_set):
        return sum(cached[t][layer] for t in step_set) / layer_bytes[layer]

    if static:
        everything = range(steps)
        kept = {l for l in range(layers) if value(l, everything)}
        removed = []
        while sum(layer_bytes[l] for l in kept) > budget:
            layer = min(kept, key=lambda l: value(l, everything))
            kept.discard(layer)
            removed.append(layer)
        # Greedy may give up more than needed: take back what still fits, most valuable first.
        for layer in sorted(removed, key=lambda l: -value(l, everything)):
            if sum(layer_bytes[l] for l in kept) + layer_bytes[layer] <= budget:
                kept.add(layer)
        return [frozenset() if l in kept or not value(l, everything) else frozenset(everything) for l in range(layers)]

    kept = [{l for l in range(layers) if cached[t][l]} for t in range(steps)] + [set()]

    def held(t):
        return sum(layer_bytes[l] for l in kept[t] | kept[t + 1])

    for t in range(1, steps):
        removed = []
        while held(t) > budget:
            layer = min(kept[t] | kept[t + 1], key=lambda l: value(l, [s for s in (t, t + 1) if l in kept[s]]))
            for s in (t, t + 1):
                if layer in kept[s]:
                    kept[s].discard(layer)
                    removed.append((layer, s))
        for layer, s in sorted(removed, key=lambda pair: -value(pair[0], [pair[1]])):
            kept[s].add(layer)
            if held(t - 1) > budget or held(t) > budget:
                kept[s].discard(layer)
    return [frozenset(t for t in range(steps) if cached[t][l] and l not in kept[t]) for l in range(layers)]


def _size(num_bytes: int) -> str:
    """Bytes in GiB, or in MiB below one GiB (a small budget is not "0.00 GiB")."""
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.2f} MiB"
