"""Plans: one method per denoising step x attention layer x head, as versioned, readable JSON."""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ._files import write_atomically
from ._geometry import TileGrid
from .methods import Method, canonical, parse_method
from .model import LayerSpec, ModelSpec, _is_int, describe

__all__ = ["LayerSpec", "ModelSpec", "Plan", "PlanMismatchError"]

PLAN_TYPE = "ditfastattn.plan"
PLAN_VERSION = 1
_PLAN_FIELDS = {"type", "version", "model", "num_steps", "provenance", "methods", "scores"}
_TILE_WITHOUT_GRID = "tile= needs the image grid: pass grid=(frames, rows, cols) too"


class PlanMismatchError(ValueError):
    """A plan does not fit the model or the pipeline's step count."""


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON data, so that a plan always saves (it is often made after long work):
    numpy and torch numbers as Python numbers, tuples and arrays as lists, and NaN and infinities,
    which JSON cannot hold, as None (not measured)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        bad = [key for key in value if not isinstance(key, str)]
        if bad:
            raise TypeError(f"{where} has the key {bad[0]!r}; plans store only string keys")
        return {key: _json_value(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(item) is float for item in value):  # the bulk of the scores
            return [item if math.isfinite(item) else None for item in value]
        return [_json_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return _json_value(value.tolist(), where)
    raise TypeError(f"{where} holds a {type(value).__name__}, which a plan file cannot store; give numbers, "
                    "strings, lists or dicts")


def _method_rows(methods: Any) -> list[list[list[str]]]:
    """``methods[step][layer][head]`` as lists, refusing strings where lists belong (they would
    be read one character per head)."""

    def rows(value, what):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{what} must be a list, not {type(value).__name__} {str(value)[:40]!r}")
        return list(value)

    out = []
    for step, layers in enumerate(rows(methods, "methods")):
        out.append([])
        for layer, heads in enumerate(rows(layers, f"methods[{step}]")):
            heads = rows(heads, f"methods[{step}][{layer}] (one method name per head)")
            if not all(isinstance(m, str) for m in heads):
                raise ValueError(f"methods[{step}][{layer}] must hold method names (strings)")
            out[-1].append([canonical(m) for m in heads])
    return out


# What a plan made here records of its making; one read from a file keeps the file's, or none.
_STAMPS = ("library_version", "date")


def _library_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class _Resolution:
    """The resolution a plan's costs are counted at: image and text tokens, and the image's tiles
    (None when its grid is unknown, which only tile windows need)."""

    num_image_tokens: int
    text_len: int
    tiles: TileGrid | None


class Plan:
    """Head-wise compression plan.

    ``methods[step][layer][head]`` is a method name (see :mod:`ditfastattn.methods`). ``provenance``
    records how the plan was made (resolution as ``num_image_tokens`` and ``text_len``, and for
    images known as a grid, as video is, ``grid`` (frames, rows, cols) and ``tile``, which size
    ``tile:`` windows; search settings, library version, date); ``scores`` optionally keeps the
    per-head calibration scores it was derived from.
    """

    def __init__(
        self,
        model: ModelSpec,
        methods: Sequence[Sequence[Sequence[str]]],
        provenance: dict[str, Any] | None = None,
        scores: dict[str, Any] | None = None,
    ):
        if not isinstance(model, ModelSpec):
            raise TypeError(f"model must be a ModelSpec; got {type(model).__name__}")
        if not (provenance is None or isinstance(provenance, dict)):
            raise TypeError(f"provenance must be a dict or None; got {type(provenance).__name__}")
        if not (scores is None or isinstance(scores, dict)):
            raise TypeError(f"scores must be a dict or None; got {type(scores).__name__}")
        self.model = model
        self.methods = _method_rows(methods)
        self.provenance = _json_value(dict(provenance or {}), "provenance")
        stamps = {"library_version": _library_version(),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for key in _STAMPS:
            self.provenance.setdefault(key, stamps[key])
        self.scores = _json_value(scores, "scores")
        self.validate()
        tiles = self._recorded_tiles()
        if tiles is not None:  # the tile shape written out, so that a later default cannot change its meaning
            self.provenance.update(grid=list(tiles.grid), tile=list(tiles.tile))
            if self.provenance.get("num_image_tokens") is None:
                self.provenance["num_image_tokens"] = tiles.tokens

    # construction -------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        model,
        num_inference_steps: int,
        method: str,
        *,
        num_image_tokens: int | None = None,
        text_len: int | None = None,
        grid: tuple[int, int, int] | None = None,
        tile: tuple[int, int, int] | None = None,
    ) -> "Plan":
        """Every head of every layer runs ``method`` at every step except step 0, which runs ``full``.

        ``model`` is a transformer (or pipeline) of a supported family, or its :class:`ModelSpec`.
        ``num_image_tokens`` and ``text_len`` (optional) let :meth:`summary` work without arguments;
        ``grid`` (frames, rows, cols of latent patches; ``num_image_tokens`` defaults to their count)
        and ``tile`` (the tile shape, by default of 2 x 8 x 8 (video only), 1 x 8 x 16 and 1 x 16 x 8 the
        first that leaves the fewest pad slots; a plan runs in the tile shape it records for the call's grid) record
        the image grid that sizes ``tile:`` windows.
        """
        if not (_is_int(num_inference_steps) and num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps must be an int >= 1; got {num_inference_steps!r}")
        if grid is None and tile is not None:
            raise ValueError(_TILE_WITHOUT_GRID)
        spec = describe(model)
        method = canonical(method)
        rows = [
            [["full" if step == 0 else method] * layer.heads for layer in spec.layers]
            for step in range(num_inference_steps)
        ]
        provenance = {"source": f"uniform {method}", "num_image_tokens": num_image_tokens, "text_len": text_len}
        if grid is not None:
            provenance.update(grid=grid, tile=tile)
        return cls(spec, rows, provenance)

    # access -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.methods)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.model.layers]

    def method(self, step: int, layer: int, head: int) -> Method:
        return parse_method(self.methods[step][layer][head])

    # validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        layers = self.model.layers
        if not self.methods:
            raise ValueError("a plan needs at least one denoising step")
        for key, low in (("num_image_tokens", 1), ("text_len", 0)):
            value = self.provenance.get(key)
            if value is not None and not (_is_int(value) and value >= low):
                raise ValueError(f"provenance {key} must be an int >= {low} or absent; got {value!r}")
        if not isinstance(self.provenance.get("search", {}), dict):
            raise ValueError(f"provenance search must be a dict; got {self.provenance['search']!r}")
        switches = self.provenance.get("expert_switch_steps", [])
        if not (isinstance(switches, list) and all(_is_int(s) and 0 <= s < self.num_steps for s in switches)):
            raise ValueError(f"provenance expert_switch_steps must be a list of step indices (ints in [0, "
                             f"{self.num_steps})) or absent; got {switches!r}")
        tiles = self._recorded_tiles()
        tokens = self.provenance.get("num_image_tokens")
        if tiles is not None and tokens is not None and tokens != tiles.tokens:
            raise ValueError(f"provenance grid {list(tiles.grid)} holds {tiles.tokens} patches, but num_image_tokens "
                             f"is {tokens}; record the grid of those image tokens")
        for step, rows in enumerate(self.methods):
            if len(rows) != len(layers):
                raise ValueError(f"step {step} has {len(rows)} layers; the model has {len(layers)}")
            for layer, heads in zip(layers, rows):
                if len(heads) != layer.heads:
                    raise ValueError(f"step {step}, layer {layer.name}: {len(heads)} methods for {layer.heads} heads")
        # What the rules below read of each distinct method, looked up once (a plan holds tens of
        # thousands of head-steps and is made at the end of every calibration pass).
        traits = {}
        for rows in self.methods:
            for heads in rows:
                for method_name in heads:
                    if method_name not in traits:
                        m = parse_method(method_name)
                        traits[method_name] = (m.reads_previous_output, m.reads_residual, m.exact, m.computes, m.fraction)
        for index, layer in enumerate(layers):
            for head in range(layer.heads):
                self._validate_head(index, layer.name, head, traits)

    def _validate_head(self, layer: int, name: str, head: int, traits: dict[str, tuple]) -> None:
        computed = False
        last_full: int | None = None
        residual_fraction: float | None = None
        for step in range(self.num_steps):
            method_name = self.methods[step][layer][head]
            previous, residual, exact, computes, fraction = traits[method_name]
            if step == 0 and (previous or residual):
                raise ValueError(f"step 0, layer {name}, head {head}: step 0 must compute every head exactly once; "
                                 f"got {method_name!r}")
            if previous and not computed:
                raise ValueError(f"step {step}, layer {name}, head {head}: 'cache' needs an earlier step that computes "
                                 "this head")
            if residual:
                where = f"step {step}, layer {name}, head {head}"
                if last_full is None:
                    raise ValueError(f"{where}: {method_name!r} needs an earlier 'full' step of this head")
                if residual_fraction not in (None, fraction):
                    raise ValueError(
                        f"{where}: {method_name!r} after arrow_residual:{residual_fraction:g} since the last 'full' "
                        f"step (step {last_full}); one residual window per full step"
                    )
                residual_fraction = fraction
            if exact:
                last_full, residual_fraction = step, None
            computed = computed or computes

    def check_compatible(self, model: ModelSpec, num_steps: int | None = None) -> None:
        """Raise :class:`PlanMismatchError` naming both sides when this plan does not fit."""
        if model != self.model:
            raise PlanMismatchError(
                f"this plan was made for {self.model.describe()}, but the model is {model.describe()}; "
                "calibrate a plan for this model (ditfastattn.calibrate or `ditfastattn calibrate`)"
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise PlanMismatchError(
                f"this plan has {self.num_steps} denoising steps but the pipeline runs {num_steps}; "
                f"pass num_inference_steps={self.num_steps}, or calibrate a plan for {num_steps} steps"
            )

    # summary ------------------------------------------------------------------------------
    def _recorded_tiles(self) -> TileGrid | None:
        """The image grid and tile shape the provenance records, or None."""
        grid, tile = self.provenance.get("grid"), self.provenance.get("tile")
        if grid is None:
            if tile is not None:
                raise ValueError(f"provenance tile {tile!r} needs the grid it cuts: record grid (frames, rows, cols)")
            return None
        try:
            return TileGrid(grid, tile)
        except ValueError as err:
            raise ValueError(f"the plan's grid and tile (provenance): {err}") from None

    def _resolve(self, num_image_tokens: int | None = None, text_len: int | None = None, grid=None,
                 tile=None) -> _Resolution:
        """The resolution to count costs at: the arguments given, else the plan's. A grid given
        sets the image tokens; without one, the plan's grid serves if it holds that many (a tile
        given alone is taken on the plan's grid)."""
        if num_image_tokens is not None and not (_is_int(num_image_tokens) and num_image_tokens > 0):
            raise ValueError(f"num_image_tokens must be a positive int; got {num_image_tokens!r}")
        if text_len is not None and not (_is_int(text_len) and text_len >= 0):
            raise ValueError(f"text_len must be an int >= 0; got {text_len!r}")
        recorded = self._recorded_tiles()
        if grid is None and tile is not None:
            if recorded is None:
                raise ValueError(_TILE_WITHOUT_GRID)
            grid = recorded.grid  # another tile on the plan's own grid
        if grid is not None:
            tiles = TileGrid(grid, tile)
            if tile is None and recorded is not None and recorded.grid == tiles.grid:
                tiles = recorded
            if num_image_tokens is not None and num_image_tokens != tiles.tokens:
                raise ValueError(f"the grid {tiles.grid} holds {tiles.tokens} patches, not num_image_tokens="
                                 f"{num_image_tokens}; give the grid of those image tokens (or the grid alone)")
            num_image_tokens = tiles.tokens
        else:
            if num_image_tokens is None:
                num_image_tokens = self.provenance.get("num_image_tokens")
            tiles = recorded if recorded is not None and recorded.tokens == num_image_tokens else None
        if text_len is None:
            text_len = self.provenance.get("text_len")
            if text_len is None and not any(layer.text for layer in self.model.layers):
                text_len = 0  # nothing to attend over but the image (Wan's self-attention)
        if not num_image_tokens or text_len is None:
            raise ValueError(
                "this plan does not record its resolution: pass num_image_tokens= and text_len= "
                "(e.g. FLUX at 1024x1024: 4096 and 512; SD3: 4096 and 333), or grid= for video"
            )
        return _Resolution(int(num_image_tokens), int(text_len), tiles)

    def _geometry(self, num_image_tokens: int | None, text_len: int | None) -> tuple[int, int]:
        """``(num_image_tokens, text_len)``: the arguments given, else the plan's."""
        geometry = self._resolve(num_image_tokens, text_len)
        return geometry.num_image_tokens, geometry.text_len

    def _head_costs(self, geometry: _Resolution) -> list[list[list[float]]]:
        """``[step][layer][head]``: the share of a full head's attention FLOPs each head computes."""
        if geometry.tiles is None:
            names = {m for rows in self.methods for heads in rows for m in heads}
            windows = sorted(m for m in names if parse_method(m).needs_grid)
            if windows:
                recorded = self._recorded_tiles()
                what = ("which the plan does not record" if recorded is None else
                        f"which the plan records for {recorded.tokens} image tokens, not {geometry.num_image_tokens}")
                raise ValueError(
                    f"this plan's tile windows or pooled keys ({', '.join(windows[:3])}"
                    f"{', ...' if len(windows) > 3 else ''}) are sized by the image grid, {what}: pass grid=(frames, rows, cols) of the "
                    f"{geometry.num_image_tokens} image tokens (and tile= for another tile shape than the default), "
                    "or record it when making the plan (Plan.uniform(..., grid=...), provenance 'grid')"
                )
        known: dict[tuple[str, int], float] = {}

        def cost(name: str, text_len: int) -> float:
            if (name, text_len) not in known:
                known[name, text_len] = parse_method(name).cost(geometry.num_image_tokens, text_len, geometry.tiles)
            return known[name, text_len]

        texts = [geometry.text_len if layer.text else 0 for layer in self.model.layers]
        costs = [[[cost(m, text) for m in heads] for heads, text in zip(rows, texts)] for rows in self.methods]
        # A full step also computes the window of the head's next arrow_residual step (before its next
        # full step), whose residual (full - arrow) that step adds: the runtime's capture.
        residual = {name for name, _ in known if parse_method(name).reads_residual}
        for layer, text in enumerate(texts if residual else ()):
            for head in range(self.model.layers[layer].heads):
                later = None  # the head's next exact or residual-reading method after this step
                for step in reversed(range(self.num_steps)):
                    method = parse_method(self.methods[step][layer][head])
                    if method.exact and later is not None and later.reads_residual:
                        costs[step][layer][head] += cost(later.name, text)
                    if method.exact or method.reads_residual:
                        later = method
        return costs

    def summary(
        self,
        num_image_tokens: int | None = None,
        text_len: int | None = None,
        *,
        grid: tuple[int, int, int] | None = None,
        tile: tuple[int, int, int] | None = None,
    ) -> dict[str, Any]:
        """Attention sparsity (fraction of attention FLOPs removed, exact from the block geometry).

        Keys: ``sparsity`` (overall), ``sparsity_per_step``, ``sparsity_per_layer``,
        ``method_counts``, ``method_share``, ``speedup_estimate`` (ideal attention speed-up
        1 / (1 - sparsity)), and the geometry used (``grid`` and ``tile`` None where unknown). CFG
        sharing counts as half the cost of its computed part (a CFG batch is assumed); a full step
        that keeps a residual for a later ``arrow_residual`` step also counts that window. The geometry
        is the plan's unless given; ``tile:`` windows need the image's ``grid`` (frames, rows, cols).
        """
        geometry = self._resolve(num_image_tokens, text_len, grid, tile)
        costs = self._head_costs(geometry)
        layer_flops, layer_kept = [], [[0.0] * len(self.model.layers) for _ in range(self.num_steps)]
        for index, layer in enumerate(self.model.layers):
            tokens = geometry.num_image_tokens + (geometry.text_len if layer.text else 0)
            per_head = float(tokens * tokens * layer.head_dim)
            layer_flops.append(per_head * layer.heads)
            for step in range(self.num_steps):
                layer_kept[step][index] = per_head * sum(costs[step][index])
        step_total = sum(layer_flops)
        per_step = [1.0 - sum(row) / step_total for row in layer_kept]
        per_layer = {
            layer.name: 1.0 - sum(row[i] for row in layer_kept) / (layer_flops[i] * self.num_steps)
            for i, layer in enumerate(self.model.layers)
        }
        sparsity = 1.0 - sum(map(sum, layer_kept)) / (step_total * self.num_steps)
        counts = Counter(m for rows in self.methods for heads in rows for m in heads)
        total = sum(counts.values())
        tiles = geometry.tiles
        return {
            "sparsity": sparsity,
            "sparsity_per_step": per_step,
            "sparsity_per_layer": per_layer,
            "method_counts": dict(sorted(counts.items())),
            "method_share": {k: v / total for k, v in sorted(counts.items())},
            "speedup_estimate": math.inf if sparsity >= 1.0 else 1.0 / (1.0 - sparsity),
            "num_image_tokens": geometry.num_image_tokens,
            "text_len": geometry.text_len,
            "grid": None if tiles is None else tiles.grid,
            "tile": None if tiles is None else tiles.tile,
            "num_steps": self.num_steps,
            "num_layers": len(self.model.layers),
        }

    def __repr__(self) -> str:
        counts = Counter(m for rows in self.methods for heads in rows for m in heads)
        top = ", ".join(f"{name}: {count}" for name, count in counts.most_common(4))
        return f"Plan({self.model.model_class}, {self.num_steps} steps x {len(self.model.layers)} layers; {top})"

    # serialisation ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "type": PLAN_TYPE,
            "version": PLAN_VERSION,
            "model": self.model.to_json(),
            "num_steps": self.num_steps,
            "provenance": self.provenance,
            # One space-separated string per step and layer keeps the file readable and diffable.
            "methods": [[" ".join(heads) for heads in rows] for rows in self.methods],
            "scores": self.scores,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("type") != PLAN_TYPE:
            raise ValueError(f"{source} is not a ditfastattn plan (no \"type\": \"{PLAN_TYPE}\"); is it the right file?")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"{source} has plan format version {data.get('version')!r}; this ditfastattn "
                f"({_library_version()}) reads version {PLAN_VERSION}: upgrade ditfastattn or recalibrate"
            )
        unknown = sorted(set(data) - _PLAN_FIELDS)
        if unknown:
            raise ValueError(f"{source} has fields a version-{PLAN_VERSION} plan does not: {unknown}; is it hand-edited?")
        try:
            if not _is_int(data["num_steps"]):
                raise ValueError(f"num_steps must be an int; got {data['num_steps']!r}")
            if not (isinstance(data["methods"], list) and all(
                    isinstance(rows, list) and all(isinstance(row, str) for row in rows) for rows in data["methods"])):
                raise ValueError("methods must hold, per step, one string per layer: its heads' methods separated "
                                 "by spaces (as Plan.save writes them)")
            model = ModelSpec.from_json(data["model"])
            methods = [[row.split() for row in rows] for rows in data["methods"]]
            if len(methods) != data["num_steps"]:
                raise ValueError(f"num_steps says {data['num_steps']} but {len(methods)} steps are stored")
            plan = cls(model, methods, data.get("provenance"), data.get("scores"))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{source} is a corrupt ditfastattn plan: {err}") from err
        for key in _STAMPS:  # a file that records no version or date is not stamped as made now, by this one
            if key not in (data.get("provenance") or {}):
                del plan.provenance[key]
        return plan

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON; the file is replaced only once it is fully written."""
        body = self.to_json()
        scores = json.dumps(body.pop("scores"), separators=(",", ":"), allow_nan=False)
        # Scores stay on one line: indenting hundreds of thousands of numbers helps no reader.
        text = json.dumps(body, indent=1, allow_nan=False)[:-2] + f',\n "scores": {scores}\n}}\n'
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give the plan's JSON file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_json(data, source=str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no plan file at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the plan file is corrupt") from err
        except RecursionError:  # JSON nested deeper than Python's recursion limit
            raise ValueError(f"{path} nests its JSON too deeply for a plan; the plan file is corrupt") from None

    def __eq__(self, other: object) -> bool:
        """The same methods for the same model, run alike: the experts' switch steps (none recorded:
        none) and, where a method needs the image grid, the grid and tile shape that size it."""
        if not (isinstance(other, Plan) and self.model == other.model and self.methods == other.methods):
            return False
        keys = ("expert_switch_steps", "grid", "tile") if self._needs_grid() else ("expert_switch_steps",)
        return all((self.provenance.get(key) or []) == (other.provenance.get(key) or []) for key in keys)

    def _needs_grid(self) -> bool:
        """Whether some method (tile windows, pooled keys) is sized by the image grid."""
        return any(parse_method(m).needs_grid for m in {m for rows in self.methods for heads in rows for m in heads})
