"""Read a predictor's inputs from its source, by the rules `cog build` applies, without importing it.

Since Cog 0.20 the `cog` CLI never imports predict.py to make `.cog/openapi_schema.json`: it parses the
source with tree-sitter and resolves each `Input()` argument statically (replicate/cog
`pkg/schema/python/`: inputs.go, literals.go, module_scope.go). What it accepts:

- `default=`: a literal, or a name bound to a literal by a top-level assignment of the same file;
  anything else (an attribute such as `c.X`, an imported name, a call) silently becomes None.
- `ge=`, `le=`, `min_length=`, `max_length=`: number literals only; anything else is silently dropped.
- `description=`: a plain string literal or a name bound to one; f-strings are silently dropped.
- `regex=`, `accept=`: a string literal. `deprecated=`: True or False.
- `choices=`: a list literal, a name bound to one, `list(D.keys())` / `list(D.values())` of a top-level
  dict literal, or `A + B` of those; anything else stops the build:
  "parameter 'x': choices expression cannot be statically resolved".
- a plain default (no `Input()`) must resolve like `default=`, else the build stops.

This reader applies the same rules, and stops with Cog's message where Cog stops. Where Cog would carry on
but silently lose part of the API (a default turning into None, a bound dropped), it stops too, naming the
argument: a schema that only looks complete is the defect this module exists to prevent. Cog also takes a
string's text between its quotes verbatim (no escapes processed, implicit concatenation mangled), so
strings with backslashes or implicit concatenation are refused for the same reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Cog's primitive types by annotation name, and their JSON Schema (pkg/schema/types.go, JSONType).
PRIMITIVES: dict[str, dict[str, Any]] = {
    "bool": {"type": "boolean"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
    "Any": {"type": "object"},
}
NUMBER_ARGUMENTS = ("ge", "le", "min_length", "max_length")
STRING_ARGUMENTS = ("regex", "accept")
KNOWN_ARGUMENTS = {"default", "description", "choices", "deprecated", *NUMBER_ARGUMENTS, *STRING_ARGUMENTS}
NO_DEFAULT = object()


class StaticSchemaError(ValueError):
    """predict.py cannot be read statically (as `cog build` reads it) without stopping or losing something."""


@dataclass(frozen=True)
class InputType:
    """An input's annotation: a primitive, optionally in a list, optionally nullable (`X | None`)."""

    primitive: str
    is_list: bool = False
    nullable: bool = False

    def json_schema(self) -> dict[str, Any]:
        schema = dict(PRIMITIVES[self.primitive])
        if self.is_list:
            schema = {"type": "array", "items": schema}
        return schema


@dataclass
class StaticInput:
    name: str
    order: int
    type: InputType
    default: Any = NO_DEFAULT
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    regex: str | None = None
    choices: list | None = None
    deprecated: bool | None = None
    accept: str | None = None


@dataclass
class StaticPredictor:
    inputs: list[StaticInput] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)


class _Unresolvable(Exception):
    pass


def _cog_string_text(segment: str) -> str | None:
    """The text Cog takes for a string literal (literals.go, parseStringLiteral): what lies between the quotes."""
    for quote in ('"""', "'''"):
        if segment.startswith(quote) and len(segment) >= 6:
            return segment[3:-3]
    if segment[:1] in ('"', "'") and len(segment) >= 2:
        return segment[1:-1]
    if segment[:2] in ('r"', "r'") and len(segment) >= 3:
        return segment[2:-1]
    return None


class _Reader:
    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename
        self.tree = ast.parse(source, filename)
        self.scope = self._module_scope()
        self.input_names = self._input_names()

    def _text(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or ast.unparse(node)

    def string(self, node: ast.expr, what: str) -> str:
        if isinstance(node, ast.JoinedStr):
            raise StaticSchemaError(f"{what}: Cog drops f-strings; use a plain string literal")
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            raise _Unresolvable
        if _cog_string_text(self._text(node)) != node.value:
            raise StaticSchemaError(
                f"{what}: Cog takes a string's text between its quotes verbatim (no escapes, no implicit "
                "concatenation, no u/b prefixes), so it would read another text; use one plain string literal"
            )
        return node.value

    def literal(self, node: ast.expr, what: str) -> Any:
        """Cog's parseDefaultValue: None, bools, numbers (with a unary minus), strings, lists, tuples, dicts, sets."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str) or isinstance(node, ast.JoinedStr):
            return self.string(node, what)
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, bool | int | float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.literal(node.operand, what)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return -value
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return [self.literal(item, what) for item in node.elts]
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.literal(k, what): self.literal(v, what) for k, v in zip(node.keys, node.values)}
        raise _Unresolvable

    def number(self, node: ast.expr) -> float | int:
        """Cog parses the argument's text as a number (Go's ParseFloat): a literal, with a sign, nothing else."""
        sign = 1
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            sign = -1 if isinstance(node.op, ast.USub) else 1
            node = node.operand
        if (
            not isinstance(node, ast.Constant)
            or isinstance(node.value, bool)
            or not isinstance(node.value, int | float)
        ):
            raise _Unresolvable
        if "_" in self._text(node) or self._text(node).lower().startswith(("0x", "0o", "0b")):
            raise _Unresolvable  # digit separators and base prefixes: Go's ParseFloat reads neither
        return sign * node.value

    def _module_scope(self) -> dict[str, Any]:
        """Top-level `NAME = literal` bindings (Cog's collectModuleScope); the last one wins, as in Python."""
        scope = {}
        for stmt in self.tree.body:
            target, value = None, None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                target, value = stmt.target, stmt.value
            if isinstance(target, ast.Name):
                try:
                    scope[target.id] = self.literal(value, f"top-level {target.id}")
                except (_Unresolvable, StaticSchemaError):
                    scope.pop(target.id, None)
        return scope

    def _input_names(self) -> set[str]:
        names = {"Input"}
        for stmt in self.tree.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "cog":
                names |= {alias.asname or alias.name for alias in stmt.names if alias.name == "Input"}
        return names

    def resolve(self, node: ast.expr, what: str) -> Any:
        """A literal, or a name bound to one at the top of the file (Cog's resolveDefaultExpr)."""
        try:
            return self.literal(node, what)
        except _Unresolvable:
            if isinstance(node, ast.Name) and node.id in self.scope:
                return self.scope[node.id]
            raise

    def choices(self, node: ast.expr) -> list:
        if isinstance(node, ast.List):
            return self.resolve(node, "choices")
        if isinstance(node, ast.Name) and isinstance(self.scope.get(node.id), list):
            return self.scope[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.choices(node.left) + self.choices(node.right)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "list"
            and len(node.args) == 1
            and isinstance(inner := node.args[0], ast.Call)
            and isinstance(inner.func, ast.Attribute)
            and isinstance(inner.func.value, ast.Name)
            and inner.func.attr in ("keys", "values")
            and isinstance(mapping := self.scope.get(inner.func.value.id), dict)
        ):
            return list(mapping.keys() if inner.func.attr == "keys" else mapping.values())
        raise _Unresolvable

    def annotation(self, node: ast.expr | None, where: str) -> InputType:
        if node is None:
            raise StaticSchemaError(f"{where} has no type annotation")
        members = _union_members(node)
        nullable = any(_is_none(m) for m in members)
        members = [m for m in members if not _is_none(m)]
        if len(members) != 1:
            raise StaticSchemaError(f"{where}: union types are not supported here; use one type, or `X | None`")
        node = members[0]
        if isinstance(node, ast.Subscript) and _name(node.value) in ("list", "List"):
            item = self.annotation(node.slice, where)
            if item.is_list or item.nullable:
                raise StaticSchemaError(f"{where}: only lists of a plain type are supported")
            return InputType(item.primitive, is_list=True, nullable=nullable)
        name = _name(node)
        if name not in PRIMITIVES:
            raise StaticSchemaError(f"{where}: unsupported type `{self._text(node)}`")
        return InputType(name, nullable=nullable)

    def input_call(self, call: ast.Call, item: StaticInput) -> None:
        param = f"parameter '{item.name}'"
        if call.args:
            raise StaticSchemaError(f"{param}: Input() takes keyword arguments only; Cog ignores positional ones")
        for keyword in call.keywords:
            key, value = keyword.arg, keyword.value
            what = f"{param}: {key}=`{self._text(value)}`"
            if key == "default_factory":
                raise StaticSchemaError(f"{param}: default_factory is not supported in static schema generation")
            if key not in KNOWN_ARGUMENTS:
                raise StaticSchemaError(f"{param}: Input() has no argument {key!r}; Cog would ignore it")
            try:
                if key == "choices":
                    try:
                        item.choices = self.choices(value)
                    except _Unresolvable:
                        raise StaticSchemaError(f"{param}: choices expression cannot be statically resolved") from None
                elif key == "default":
                    item.default = self.resolve(value, what)
                elif key == "description":
                    item.description = self._string_or_name(value, what)
                elif key in NUMBER_ARGUMENTS:
                    number = self.number(value)
                    setattr(item, key, int(number) if key.endswith("length") else number)
                elif key in STRING_ARGUMENTS:
                    setattr(item, key, self.string(value, what))
                elif key == "deprecated":
                    if not (isinstance(value, ast.Constant) and isinstance(value.value, bool)):
                        raise _Unresolvable
                    item.deprecated = value.value
            except _Unresolvable:
                allowed = {
                    "default": "a literal, or a name bound to a literal at the top of this file",
                    "description": "a plain string literal, or a name bound to one at the top of this file",
                    "deprecated": "True or False",
                }.get(key, "a number literal" if key in NUMBER_ARGUMENTS else "a string literal")
                raise StaticSchemaError(
                    f"{what} cannot be statically resolved: Cog's parser would silently drop it. Use {allowed}."
                ) from None

    def _string_or_name(self, node: ast.expr, what: str) -> str:
        if isinstance(node, ast.Name) and isinstance(self.scope.get(node.id), str):
            return self.scope[node.id]
        return self.string(node, what)

    def predictor(self, class_name: str, method_names: tuple[str, ...]) -> StaticPredictor:
        classes = {s.name: s for s in self.tree.body if isinstance(s, ast.ClassDef)}
        if class_name not in classes:
            raise StaticSchemaError(f"{self.filename}: no top-level class {class_name!r}")
        methods = {s.name: s for s in classes[class_name].body if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)}
        method = next((methods[name] for name in method_names if name in methods), None)
        if method is None:
            raise StaticSchemaError(f"{class_name} has no {' or '.join(method_names)}() method")
        where = f"{class_name}.{method.name}"
        args = method.args
        if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
            raise StaticSchemaError(f"{where}: inputs must be plain parameters (no *, *args, **kwargs, /)")
        params = args.args[1:] if args.args and args.args[0].arg == "self" else args.args
        defaults = [None] * (len(params) - len(args.defaults)) + list(args.defaults)
        info = StaticPredictor()
        for order, (param, default) in enumerate(zip(params, defaults)):
            item = StaticInput(
                param.arg, order, self.annotation(param.annotation, f"parameter '{param.arg}' on {where}")
            )
            if isinstance(default, ast.Call) and _name(default.func) in self.input_names:
                self.input_call(default, item)
            elif default is not None:
                try:
                    item.default = self.resolve(default, f"parameter '{param.arg}'")
                except _Unresolvable:
                    raise StaticSchemaError(
                        f"parameter '{param.arg}': default `{self._text(default)}` cannot be statically resolved"
                    ) from None
            info.inputs.append(item)
        info.output = _output_schema(self, method.returns, where)
        return info


def _union_members(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    if isinstance(node, ast.Subscript) and _name(node.value) == "Optional":
        return [node.slice, ast.Constant(None)]
    return [node]


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _output_schema(reader: _Reader, node: ast.expr | None, where: str) -> dict[str, Any]:
    if node is None:
        raise StaticSchemaError(f"{where} has no return type annotation")
    output_type = reader.annotation(node, f"the return type of {where}")
    schema = {**output_type.json_schema(), "title": "Output"}
    if output_type.nullable:
        schema["nullable"] = True
    return schema


def read_predictor(path: Path | str, class_name: str = "Predictor") -> StaticPredictor:
    """The inputs and output of `class_name` in the file at `path`, read as `cog build` reads them."""
    path = Path(path)
    try:
        source = path.read_text()
    except OSError as e:
        raise StaticSchemaError(f"failed to read predictor source {path}: {e.strerror}") from e
    return _Reader(source, str(path)).predictor(class_name, ("run", "predict"))
