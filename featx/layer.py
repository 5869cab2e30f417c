"""Layer records, the layer-selection grammar and the pooling rules; torch-free.

One :class:`Layer` describes a tappable activation everywhere it appears: in a traced
ladder, in a cache entry (then it also names the pooling rule, pooled width and stored
dtype), in probe results and in the command line's rows. Tracing a network to find its
layers lives in ``featx.backbones.ladder``; the cache, probing and reporting import only
this module, so they never load torch. (Singular: ``featx.layers()`` is the API that traces
a model's ladder.)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from .errors import UnknownLayerError, UsageError, close_matches

PRE_LOGITS = "pre_logits"
SPATIAL_POOLS = ("avg", "max", "avgmax", "grid2", "grid3", "none")
TOKEN_POOLS = ("auto", "cls", "mean", "cls+mean")
#: fields only a stored layer has; left out of a ladder's JSON while unset
_STORAGE_FIELDS = ("pool", "width", "dtype")


# ------------------------------------------------------------------------------ pooling rules


def check_pool(pool: str, token_pool: str) -> None:
    if pool not in SPATIAL_POOLS:
        raise UsageError(f"Unknown pooling {pool!r}. Valid: {', '.join(SPATIAL_POOLS)}.")
    if token_pool not in TOKEN_POOLS:
        raise UsageError(f"Unknown token pooling {token_pool!r}. Valid: {', '.join(TOKEN_POOLS)}.")


def layer_rule(kind: str, has_cls: bool, pool: str, token_pool: str) -> str:
    """The rule actually applied to a layer of ``kind``; recorded with the layer in the cache."""
    if kind == "vector":
        return "identity"
    if pool == "none":
        return "none"
    if kind == "tokens":
        rule = token_pool
        if rule == "auto":
            rule = "cls" if has_cls else "mean"
        if "cls" in rule and not has_cls:
            rule = "mean"  # this layer carries no class token (e.g. the patch embedding)
        return rule
    return pool


def pooled_width(raw_shape: tuple[int, ...], kind: str, rule: str) -> int:
    """Width of the pooled vector for a per-sample shape ``raw_shape``."""
    if rule in ("identity", "none"):
        n = 1
        for s in raw_shape:
            n *= int(s)
        return n
    channels = raw_shape[-1] if kind in ("tokens", "map_nhwc") else raw_shape[0]
    return {
        "avg": channels, "max": channels, "avgmax": 2 * channels,
        "grid2": 4 * channels, "grid3": 9 * channels,
        "cls": channels, "mean": channels, "cls+mean": 2 * channels,
    }[rule]


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Layer:
    """One tappable activation; a stored layer also names its pooling rule, width and dtype."""

    name: str
    index: int  # position in the model's ladder ("all"); -1 for a module outside it
    depth: float  # relative depth in [0, 1]
    raw_shape: tuple[int, ...]  # per image
    kind: str  # map | map_nhwc | tokens | vector
    module: str  # the hooked module ("" = the model itself)
    hook: str = "output"  # output | input (pre_logits is the classifier's input)
    order: int = 0  # execution order, for sorting and early stopping
    prefix_tokens: int = 0
    has_cls: bool = False
    aliases: tuple[str, ...] = ()
    pool: str = ""  # the pooling rule applied ("" = not pooled yet)
    width: int = 0  # pooled width (0 = not pooled yet)
    dtype: str = ""  # storage dtype in a cache entry ("" = not stored)

    def pooled(self, pool: str, token_pool: str) -> Layer:
        """This layer with the rule ``pool``/``token_pool`` resolve to for it, and its pooled width."""
        rule = layer_rule(self.kind, self.has_cls, pool, token_pool)
        return replace(self, pool=rule, width=pooled_width(self.raw_shape, self.kind, rule))

    def to_dict(self) -> dict:
        """Plain JSON; storage fields appear once set, so a ladder's JSON lists shape facts only."""
        d = asdict(self)
        d["raw_shape"], d["aliases"] = list(self.raw_shape), list(self.aliases)
        for name in _STORAGE_FIELDS:
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Layer:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["raw_shape"], d["aliases"] = tuple(d["raw_shape"]), tuple(d.get("aliases", ()))
        return cls(**d)

    def to_attrs(self) -> dict:
        """HDF5 attributes of a stored layer (its dtype is the dataset's own)."""
        return {"module": self.module, "index": self.index, "depth": self.depth, "order": self.order,
                "raw_shape": np.asarray(self.raw_shape, dtype=np.int64), "kind": self.kind,
                "pool": self.pool, "width": self.width}

    @classmethod
    def from_attrs(cls, name: str, attrs, dtype: str) -> Layer:
        return cls(name=name, module=str(attrs["module"]), index=int(attrs["index"]), depth=float(attrs["depth"]),
                   raw_shape=tuple(int(v) for v in attrs["raw_shape"]), kind=str(attrs["kind"]),
                   pool=str(attrs["pool"]), width=int(attrs["width"]), dtype=dtype,
                   order=int(attrs.get("order", attrs["index"])))


@dataclass
class Ladder:
    """Every block of a network at one input size, plus the ``auto`` selection."""

    layers: list[Layer]
    auto: list[str]
    input_size: int
    extra: dict[str, Layer] = field(default_factory=dict)  # other modules, by name and alias

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "auto": list(self.auto),
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> Ladder:
        return cls([Layer.from_dict(x) for x in d["layers"]], list(d["auto"]), int(d["input_size"]))

    def by_name(self) -> dict[str, Layer]:
        table = dict(self.extra)
        for layer in self.layers:
            for alias in layer.aliases:
                table[alias] = layer
        for layer in self.layers:
            table[layer.name] = layer
        return table

    def select(self, spec: str | list[str] | tuple[str, ...] | None, model_name: str = "MODEL",
               extra_names: dict[str, Layer] | None = None) -> list[Layer]:
        """Resolve ``auto``, ``all``, names, aliases, globs, indices and slices; shallow to deep."""
        table = self.by_name()
        if extra_names:
            table.update(extra_names)
        chosen: dict[str, Layer] = {}
        for item in _split_spec(spec):
            for layer in self._resolve(item, table, model_name):
                chosen.setdefault(layer.name, layer)
        return sorted(chosen.values(), key=lambda layer: layer.order)

    def _resolve(self, item: str, table: dict[str, Layer], model_name: str) -> list[Layer]:
        """The layers one item of a selection names, in the order it names them."""
        if item == "auto":
            return [table[name] for name in self.auto]
        if item == "all":
            return list(self.layers)
        if item in table:
            return [table[item]]
        if re.fullmatch(r"-?\d+", item):
            i = int(item)
            if not -len(self.layers) <= i < len(self.layers):
                raise UnknownLayerError(
                    f"Layer index {i} is out of range: {model_name} has {len(self.layers)} layers "
                    f"(indices 0..{len(self.layers) - 1} or -1..-{len(self.layers)}). "
                    f"See them with: featx layers {model_name}"
                )
            return [self.layers[i]]
        if ":" in item:
            picked = self.layers[_parse_slice(item, model_name)]
            if not picked:
                raise UnknownLayerError(f"Layer slice {item!r} selects no layer of {model_name}.")
            return picked
        if any(c in item for c in "*?["):
            # globs range over the ladder (names and aliases), not every inner module
            hits = [layer.name for layer in self.layers
                    if any(fnmatch.fnmatchcase(n, item) for n in (layer.name, *layer.aliases))]
            if not hits:
                raise UnknownLayerError(
                    f"Layer pattern {item!r} matches no layer of {model_name}. "
                    f"See them with: featx layers {model_name}"
                )
            return [table[n] for n in hits]
        near = close_matches(item, [layer.name for layer in self.layers] + list(table), n=5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownLayerError(
            f"Unknown layer {item!r} for {model_name}.{hint} Valid: auto, all, a name, a glob "
            f"(e.g. 'blocks.*'), an index (-1) or a slice (0:4). See them with: featx layers {model_name}"
        )


_SLICE = re.compile(r"(-?\d+)?:(-?\d+)?(?::(-?\d+)?)?")


def _parse_slice(item: str, model_name: str) -> slice:
    """``start:stop[:step]`` of ladder indices, as in Python; anything else is refused with the grammar."""
    match = _SLICE.fullmatch(item.replace(" ", ""))
    grammar = (f"A slice is start:stop or start:stop:step with integer parts that may be left out "
               f"(0:4, -3:, ::2, 4:0:-1). See the indices with: featx layers {model_name}")
    if match is None:
        raise UnknownLayerError(f"Layer slice {item!r} is not valid. {grammar}")
    start, stop, step = (int(g) if g else None for g in match.groups())
    if step == 0:
        raise UnknownLayerError(f"Layer slice {item!r} has step 0; the step must be a non-zero integer. {grammar}")
    return slice(start, stop, step)


def _split_spec(spec) -> list[str]:
    if spec is None:
        return ["auto"]
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
    else:
        items = [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise UsageError("No layers requested; use auto, all, names, globs or indices.")
    return items
