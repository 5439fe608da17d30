"""Specs: the YAML files that declare a conversion.

A spec says how to capture the model, which attention sites to rewrite (patterns + layer/module/mask
selection) and which operator replaces each. It is validated before any model is loaded, and every
error points at `file:line:col`. See `specs/README.md` for the reference.

    name: liger-attention
    capture: {attn_implementation: sdpa}
    rules:
      - pattern: softmax_attention
        layers: all
        op: liger_attention
        params: {window: 64}
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError, did_you_mean

BUILTIN_PATTERNS = ("sdpa", "eager_softmax_attention", "softmax_attention")
MASK_KINDS = ("causal", "sliding", "chunked", "bidirectional", "custom", "none")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
FUSE_BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------------
# YAML with positions: every value and key remembers where it was written.


@dataclass
class Located:
    """Source positions of a parsed YAML document, keyed by the path of keys/indices to a value."""

    file: str
    values: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    keys: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    def error(self, path: tuple, message: str, at_key: bool = False) -> SpecError:
        table = self.keys if at_key else self.values
        probe = tuple(path)
        while probe not in table and probe:
            probe = probe[:-1]  # fall back to the nearest enclosing value that has a position
        line, col = table.get(probe, (None, None))
        return SpecError(message, self.file, line, col)


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads an unquoted 1e-3 as a number: YAML 1.1 (PyYAML) floats need a dot, YAML 1.2's
    and every user's do not. A quoted or `!!str` 1e-3 stays text."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _walk(loader: _Loader, node: yaml.Node, path: tuple, loc: Located):
    loc.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        # Only plain data: tags that would build Python objects (or anything else) are refused.
        raise SpecError(f"invalid YAML: tag {node.tag} is not allowed in a spec", loc.file,
                        node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)):
                raise SpecError("mapping keys must be strings", loc.file, key_node.start_mark.line + 1,
                                key_node.start_mark.column + 1)
            if key in out:
                raise SpecError(f'duplicate key "{key}"', loc.file, key_node.start_mark.line + 1,
                                key_node.start_mark.column + 1)
            loc.keys[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _walk(loader, value_node, path + (key,), loc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, path + (i,), loc) for i, item in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    if isinstance(value, float) and math.isinf(value) and _EXPONENT_FLOAT.match(node.value):
        raise SpecError(f"{node.value} is out of range for a number", loc.file, node.start_mark.line + 1,
                        node.start_mark.column + 1)
    return value


def load_yaml(text: str, file: str) -> tuple[Any, Located]:
    """Parse YAML safely (no tags that build Python objects), keeping positions for error messages."""
    loc = Located(file)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError("the spec is empty", file, 1, 1)
        data = _walk(loader, node, (), loc)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = (err.problem or err.context or "invalid YAML").strip()
        raise SpecError(f"invalid YAML: {problem}", file, mark.line + 1 if mark else None,
                        mark.column + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise SpecError(f"invalid YAML: {err}", file) from None
    finally:
        loader.dispose()
    return data, loc


# --------------------------------------------------------------------------------------------------
# Checking helpers


def _check_keys(data: dict, allowed, path: tuple, loc: Located, what: str):
    for key in data:
        if key not in allowed:
            raise loc.error(path + (key,), f'unknown key "{key}" in {what}{did_you_mean(key, allowed)}; '
                                           f"expected one of: {', '.join(allowed)}", at_key=True)


def _type_name(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _expect(value, types, path: tuple, loc: Located, what: str):
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    if not ok:
        raise loc.error(path, f"{what} must be {_describe(types)}, got {_type_name(value)}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _describe(types) -> str:
    return " or ".join(_type_name(t()) if t is not type(None) else "nothing" for t in _as_tuple(types))


def _choice(value, choices, path: tuple, loc: Located, what: str):
    if value not in choices:
        raise loc.error(path, f'{what} "{value}" is not one of: {", ".join(map(str, choices))}'
                              f"{did_you_mean(value, choices)}")
    return value


# --------------------------------------------------------------------------------------------------
# Layer selection


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass
class LayerSelector:
    """`all`, an explicit list (`[0, 3, "5-9"]`), `{except: [...]}` or `{every: N, offset: M}`."""

    kind: str  # all | list | except | every
    layers: tuple[int, ...] = ()
    every: int = 1
    offset: int = 0
    raw: Any = "all"
    where: tuple[str | None, int | None, int | None] = (None, None, None)

    @classmethod
    def parse(cls, raw, path: tuple = (), loc: Located | None = None) -> "LayerSelector":
        loc = loc or Located("<spec>")
        where = (loc.file,) + loc.values.get(tuple(path), (None, None))
        if raw is None or raw == "all":
            return cls("all", raw="all", where=where)
        if isinstance(raw, (list, int)) and not isinstance(raw, bool):
            return cls("list", _parse_layer_list(raw, path, loc), raw=raw, where=where)
        if isinstance(raw, dict):
            _check_keys(raw, ("except", "every", "offset"), path, loc, "layers")
            if "except" in raw:
                if len(raw) != 1:
                    raise loc.error(path, 'layers: "except" cannot be combined with "every"/"offset"')
                return cls("except", _parse_layer_list(raw["except"], path + ("except",), loc), raw=raw,
                           where=where)
            if "every" not in raw:
                raise loc.error(path, 'layers: a mapping needs "except" or "every"')
            every = _expect(raw["every"], int, path + ("every",), loc, "layers.every")
            offset = _expect(raw.get("offset", 0), int, path + ("offset",), loc, "layers.offset")
            if every < 1 or offset < 0 or offset >= every:
                raise loc.error(path, f"layers: need every >= 1 and 0 <= offset < every (got every={every}, "
                                      f"offset={offset})")
            return cls("every", every=every, offset=offset, raw=raw, where=where)
        raise loc.error(path, f'layers must be "all", a list like [0, 3, "5-9"], {{except: [...]}} or '
                              f"{{every: N, offset: M}}, got {_type_name(raw)}")

    def select(self, available: list[int]) -> list[int]:
        """The selected layer indices among `available`; out-of-range indices are an error."""
        have = sorted(set(available))
        if self.kind == "all":
            return have
        if self.kind == "every":
            return [i for i in have if i % self.every == self.offset]
        missing = [i for i in self.layers if i not in have]
        if missing:
            span = f"{have[0]}-{have[-1]}" if have else "none"
            raise SpecError(f"layer {missing[0]} is out of range: the model has attention layers {span}",
                            *self.where)
        if self.kind == "list":
            return [i for i in have if i in self.layers]
        return [i for i in have if i not in self.layers]


def _parse_layer_list(raw, path, loc) -> tuple[int, ...]:
    items = raw if isinstance(raw, list) else [raw]
    out: list[int] = []
    for i, item in enumerate(items):
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.append(item)
        elif isinstance(item, str) and _RANGE.match(item):
            a, b = map(int, _RANGE.match(item).groups())
            if b < a:
                raise loc.error(path + (i,), f'layer range "{item}" is empty (end before start)')
            out.extend(range(a, b + 1))
        else:
            raise loc.error(path + (i,), f'layer "{item}" must be a non-negative integer or a range like "5-9"')
    return tuple(sorted(set(out)))


# --------------------------------------------------------------------------------------------------
# The spec


@dataclass
class CaptureConfig:
    attn_implementation: str = "sdpa"
    probe_batch: int = 2
    probe_len: int = 32
    mask_probe_len: int = 1024
    max_seq_len: int = 32768


@dataclass
class Rule:
    """Select sites (pattern + layers + module regex + mask kinds) and say what replaces them."""

    op: str
    pattern: str = "softmax_attention"
    layers: LayerSelector = field(default_factory=lambda: LayerSelector("all"))
    modules: str | None = None
    mask: tuple[str, ...] = ("any",)
    params: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    where: tuple[str | None, int | None, int | None] = (None, None, None)

    def error(self, message: str) -> SpecError:
        return SpecError(message, *self.where)


@dataclass
class Spec:
    name: str
    description: str = ""
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    rules: list[Rule] = field(default_factory=list)
    patterns: dict[str, dict] = field(default_factory=dict)
    fuse_backend: str = "auto"
    verify_tolerance: float = 1e-5
    source: str = "<dict>"
    raw: dict = field(default_factory=dict)
    located: Located | None = None
    heal: Any = None  # HealConfig (lincompile/heal/config.py) when the spec has a heal: section

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_output(cls, path: str | Path) -> "Spec":
        """The spec.yaml next to an output. It records every param's default as of when it was written, so a param
        it lacks did not exist then: it takes the value that was in effect (the operator's `legacy_params`), and
        the output loads as it was written."""
        from lincompile.kernels import registry

        spec = cls.from_yaml(path)
        for rule in spec.rules:
            if rule.op != "keep" and ":" not in rule.op:
                for name, value in registry.get(rule.op).legacy_params.items():
                    rule.params.setdefault(name, value)
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Spec":
        path = Path(path)
        if not path.exists():
            raise SpecError("spec file not found", str(path))
        if path.is_dir():
            raise SpecError("is a directory, expected a YAML spec file", str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SpecError("not a text file (expected UTF-8 YAML)", str(path)) from None
        data, loc = load_yaml(text, str(path))
        return cls.from_dict(data, loc)

    @classmethod
    def builtin(cls, name: str) -> "Spec":
        names = builtin_specs()
        if name not in names:
            raise SpecError(f'no built-in spec "{name}"{did_you_mean(name, names)}; built-ins: {", ".join(names)}')
        text = resources.files("lincompile.specs").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        data, loc = load_yaml(text, f"{name}.yaml")
        return cls.from_dict(data, loc)

    @classmethod
    def resolve(cls, name_or_path: str | Path) -> "Spec":
        """A path to a YAML file, or the name of a built-in spec (`liger-attention`)."""
        p = Path(name_or_path)
        if p.suffix in (".yaml", ".yml") or p.exists() or "/" in str(name_or_path):
            return cls.from_yaml(p)
        return cls.builtin(str(name_or_path))

    @classmethod
    def from_dict(cls, data: Any, loc: Located | None = None) -> "Spec":
        loc = loc or Located("<dict>")
        if not isinstance(data, dict):
            raise loc.error((), f"a spec must be a mapping of sections, got {_type_name(data)}")
        _check_keys(data, ("version", "name", "description", "capture", "patterns", "rules", "fuse", "verify", "heal"),
                    (), loc, "the spec")
        if data.get("version", 1) != 1:
            raise loc.error(("version",), f"spec version {data.get('version')} is not supported (expected 1)")
        spec = cls(name=_expect(data.get("name", Path(loc.file).stem), str, ("name",), loc, "name"),
                   description=_expect(data.get("description", ""), str, ("description",), loc, "description"),
                   source=loc.file, raw=copy.deepcopy(data), located=loc)
        spec.capture = _parse_capture(data.get("capture", {}), loc)
        spec.patterns = _parse_patterns(data.get("patterns", {}), loc)
        if "rules" not in data:
            raise loc.error((), 'the spec has no "rules": nothing would be converted')
        rules = _expect(data["rules"], list, ("rules",), loc, "rules")
        if not rules:
            raise loc.error(("rules",), "rules is empty: nothing would be converted")
        known_patterns = BUILTIN_PATTERNS + tuple(spec.patterns)
        spec.rules = [_parse_rule(r, i, loc, known_patterns) for i, r in enumerate(rules)]
        fuse = _expect(data.get("fuse", {}), dict, ("fuse",), loc, "fuse")
        _check_keys(fuse, ("backend",), ("fuse",), loc, "fuse")
        spec.fuse_backend = _choice(fuse.get("backend", "auto"), FUSE_BACKENDS, ("fuse", "backend"), loc,
                                    "fuse.backend")
        verify = _expect(data.get("verify", {}), dict, ("verify",), loc, "verify")
        _check_keys(verify, ("tolerance",), ("verify",), loc, "verify")
        tol = _expect(verify.get("tolerance", 1e-5), (int, float), ("verify", "tolerance"), loc, "verify.tolerance")
        spec.verify_tolerance = float(tol)
        if "heal" in data:
            from .heal.config import parse_heal
            spec.heal = parse_heal(data["heal"], loc)
        return spec

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The spec as written (comments dropped)."""
        return copy.deepcopy(self.raw)

    def resolved(self) -> dict:
        """The spec with every default filled in: what `spec.yaml` next to an output records."""
        from lincompile.kernels import registry

        c = self.capture
        rules = []
        for r in self.rules:
            params = dict(r.params)
            if r.op != "keep" and ":" not in r.op:
                params = {**registry.get(r.op).params, **params}
            rule = {"pattern": r.pattern, "layers": copy.deepcopy(r.layers.raw), "op": r.op, "params": params}
            if r.modules is not None:
                rule["modules"] = r.modules
            rule["mask"] = list(r.mask) if len(r.mask) > 1 else r.mask[0]
            rules.append(rule)
        out = {"version": 1, "name": self.name, "description": self.description,
               "capture": {"attn_implementation": c.attn_implementation,
                           "probe": {"batch": c.probe_batch, "seq_len": c.probe_len},
                           "mask_probe_len": c.mask_probe_len, "max_seq_len": c.max_seq_len}}
        if self.patterns:
            out["patterns"] = copy.deepcopy(self.patterns)
        out.update({"rules": rules, "fuse": {"backend": self.fuse_backend},
                    "verify": {"tolerance": self.verify_tolerance}})
        if self.heal is not None:
            out["heal"] = self.heal.resolved()
        return out


def _parse_capture(raw, loc: Located) -> CaptureConfig:
    raw = _expect(raw, dict, ("capture",), loc, "capture")
    keys = ("attn_implementation", "probe", "mask_probe_len", "max_seq_len")
    _check_keys(raw, keys, ("capture",), loc, "capture")
    cfg = CaptureConfig()
    if "attn_implementation" in raw:
        cfg.attn_implementation = _choice(raw["attn_implementation"], ATTN_IMPLEMENTATIONS,
                                          ("capture", "attn_implementation"), loc, "capture.attn_implementation")
    if "probe" in raw:
        probe = _expect(raw["probe"], dict, ("capture", "probe"), loc, "capture.probe")
        _check_keys(probe, ("batch", "seq_len"), ("capture", "probe"), loc, "capture.probe")
        cfg.probe_batch = _positive(probe.get("batch", cfg.probe_batch), ("capture", "probe", "batch"), loc)
        cfg.probe_len = _positive(probe.get("seq_len", cfg.probe_len), ("capture", "probe", "seq_len"), loc)
        # torch.export makes a size of 1 a constant of the program: batch and length must stay dynamic.
        if cfg.probe_batch < 2:
            raise loc.error(("capture", "probe", "batch"), "capture.probe.batch must be at least 2 (a batch of 1 "
                            "would be captured as a constant)")
        if cfg.probe_len < 2:
            raise loc.error(("capture", "probe", "seq_len"), "capture.probe.seq_len must be at least 2")
    for key in ("mask_probe_len", "max_seq_len"):
        if key in raw:
            setattr(cfg, key, _positive(raw[key], ("capture", key), loc))
    return cfg


def _positive(value, path, loc) -> int:
    _expect(value, int, path, loc, ".".join(map(str, path)))
    if value < 1:
        raise loc.error(path, f"{'.'.join(map(str, path))} must be positive, got {value}")
    return value


def _parse_patterns(raw, loc: Located) -> dict[str, dict]:
    raw = _expect(raw, dict, ("patterns",), loc, "patterns")
    out = {}
    if not raw:
        return out
    from .patterns import validate_pattern  # the user-pattern language lives with its compiler

    for name, body in raw.items():
        if name in BUILTIN_PATTERNS:
            raise loc.error(("patterns", name), f'pattern name "{name}" is a built-in pattern; choose another name',
                            at_key=True)
        validate_pattern(name, body, ("patterns", name), loc)
        out[name] = body
    return out


def _parse_rule(raw, index: int, loc: Located, known_patterns) -> Rule:
    path = ("rules", index)
    raw = _expect(raw, dict, path, loc, f"rules[{index}]")
    _check_keys(raw, ("name", "pattern", "layers", "modules", "mask", "op", "params"), path, loc, f"rules[{index}]")
    if "op" not in raw:
        raise loc.error(path, f'rules[{index}] needs "op" (the operator that replaces the matched attention)')
    op = _expect(raw["op"], str, path + ("op",), loc, "op")
    rule = Rule(op=op, index=index, where=(loc.file,) + loc.values.get(path, (None, None)))
    rule.pattern = _choice(raw.get("pattern", "softmax_attention"), known_patterns, path + ("pattern",), loc, "pattern")
    rule.layers = LayerSelector.parse(raw.get("layers", "all"), path + ("layers",), loc)
    if "modules" in raw:
        rule.modules = _expect(raw["modules"], str, path + ("modules",), loc, "modules")
        try:
            re.compile(rule.modules)
        except re.error as err:
            raise loc.error(path + ("modules",), f"modules is not a valid regular expression: {err}") from None
    mask = raw.get("mask", "any")
    masks = tuple(mask if isinstance(mask, list) else [mask])
    for i, m in enumerate(masks):
        _choice(m, MASK_KINDS + ("any",), path + ("mask",) + ((i,) if isinstance(mask, list) else ()), loc, "mask")
    rule.mask = masks
    params = _expect(raw.get("params", {}), dict, path + ("params",), loc, "params")
    rule.params = dict(params)
    _check_op(rule, path, loc)
    return rule


def _check_op(rule: Rule, path: tuple, loc: Located):
    """Check the op name and its params against the operator registry (user ops: format only)."""
    from lincompile.kernels import registry

    if ":" in rule.op:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", rule.op):
            raise loc.error(path + ("op",), f'custom op "{rule.op}" must look like "package.module:ClassName"')
        return
    if rule.op == "keep":
        if rule.params:
            raise loc.error(path + ("params",), 'op "keep" takes no params')
        return
    names = registry.names() + ["keep"]
    if rule.op not in names:
        raise loc.error(path + ("op",), f'unknown op "{rule.op}"{did_you_mean(rule.op, names)}; '
                                        f"known ops: {', '.join(names)}")
    defaults = registry.get(rule.op).params
    for key, value in rule.params.items():
        if key not in defaults:
            raise loc.error(path + ("params", key), f'unknown param "{key}" for op "{rule.op}"'
                                                    f"{did_you_mean(key, defaults)}; it takes: "
                                                    f"{', '.join(defaults) or 'no params'}", at_key=True)
        default = defaults[key]
        if default is not None and not _compatible(value, default):
            raise loc.error(path + ("params", key), f'param "{key}" of op "{rule.op}" must be '
                                                    f"{_type_name(default)}, got {_type_name(value)}")
    if rule.params:
        _check_values(rule, registry.get(rule.op), path, loc)


def _check_values(rule: Rule, cls, path: tuple, loc: Located):
    """The operator's own checks of its param values (ranges, choices), run now on a stand-in of 2 heads of 16
    on the meta device (no memory, no random numbers drawn), so that a bad value is reported at its line before
    any model is loaded. None of the checks depends on the model's sizes, except that simple_decay's
    decay_range must leave exponents > 0 for 2 heads (a one-head model would accept more)."""
    import torch

    try:
        with torch.device("meta"):
            cls(num_heads=2, num_kv_heads=2, head_dim=16, **rule.params)
    except (ValueError, TypeError, RuntimeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__  # not torch's C++ stack
        named = [k for k in rule.params if re.search(rf"\b{re.escape(k)}\b", msg)]
        at = path + ("params",) + ((named[0],) if named else ())
        raise loc.error(at, f'op "{rule.op}": {msg}') from None


def _compatible(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def builtin_specs() -> list[str]:
    root = resources.files("lincompile.specs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def builtin_description(name: str) -> str:
    """The first comment line of a built-in spec: its one-line description."""
    text = resources.files("lincompile.specs").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
