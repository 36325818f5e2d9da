"""SGLang's own protocol code, from the release `make upstream` installs without its GPU dependencies.

`import sglang` cannot work here (its package `__init__` pulls in a GPU
stack), so the pieces that define its HTTP contract are loaded on their own,
unchanged, from the installed files:

- routes: every (method, path) its FastAPI app serves and the request class
  each handler takes, read from `srt/entrypoints/http_server.py`;
- request classes: the msgspec Structs of `srt/managers/io_struct.py`,
  executed from that file together with the definitions they use; a body is
  validated the way FastAPI does it, through pydantic and SGLang's own
  `msgspec_struct_pydantic_core_schema`;
- the `/generate` JSON contract: `srt/entrypoints/api_contract.py` over
  `api/v1/api_types.py` (generated from SGLang's schema).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

UPSTREAM_DIR = Path(__file__).resolve().parents[1] / ".cache" / "upstream"


def installed_sglang() -> Path | None:
    """The newest `.cache/upstream/sglang-<version>` that `make upstream` finished installing."""
    done = sorted(UPSTREAM_DIR.glob("sglang-*/.installed"))
    return done[-1].parent if done else None


@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    body_class: str | None
    """The handler's request class (`obj: Annotated[X, Body()]` or `obj: X`), None for routes without a body."""


def _load_file(name: str, path: Path) -> types.ModuleType:
    """Execute one source file as module `name` (registered, so that its classes resolve their annotations)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


class SGLang:
    """One installed release of SGLang (the directory `pip install --target` filled)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.package = root / "sglang"
        self.version = root.name.removeprefix("sglang-")

    # -- routes ----------------------------------------------------------------

    @cached_property
    def routes(self) -> dict[str, Route]:
        source = (self.package / "srt/entrypoints/http_server.py").read_text()
        routes: dict[str, Route] = {}
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for decorator in node.decorator_list:
                route = _route(decorator, node)
                if route is not None:
                    known = routes.get(route.path)
                    methods = route.methods | (known.methods if known else frozenset())
                    routes[route.path] = Route(route.path, methods, route.body_class or (known and known.body_class))
        return routes

    # -- request classes -------------------------------------------------------

    @cached_property
    def _io_struct(self) -> types.ModuleType:
        """io_struct.py's msgspec request classes, without the module's imports of torch, zmq and the scheduler."""
        utils = self.package / "srt/utils"
        # The two small modules the request classes build on; they import nothing heavy.
        _load_file("sglang.srt.utils.msgspec_utils", utils / "msgspec_utils.py")
        _load_file("sglang.srt.utils.weight_versions", utils / "weight_versions.py")
        path = self.package / "srt/managers/io_struct.py"
        tree = ast.parse(path.read_text())
        defined = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                defined[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                defined[node.targets[0].id] = node
        light_imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                         and _is_light_import(node)]
        wanted = [name for name, node in defined.items() if isinstance(node, ast.ClassDef)
                  and _is_struct_request(node, defined)]
        selected: set[str] = set()
        todo = list(wanted)
        while todo:
            name = todo.pop()
            if name in selected:
                continue
            selected.add(name)
            todo.extend(n for n in _names(defined[name]) if n in defined and n not in selected)
        body = light_imports + sorted((defined[name] for name in selected), key=lambda node: node.lineno)
        module = types.ModuleType("sglang_upstream_io_struct")
        module.__file__ = str(path)
        sys.modules[module.__name__] = module
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), module.__dict__)
        return module

    def request_class(self, name: str) -> type:
        return getattr(self._io_struct, name)

    def validate(self, class_name: str, body: Any) -> Any:
        """`body` as SGLang's FastAPI layer reads it into `class_name`; pydantic's ValidationError if it cannot."""
        from pydantic import TypeAdapter

        return TypeAdapter(self.request_class(class_name)).validate_python({} if body is None else body)

    def field_names(self, class_name: str) -> set[str]:
        """The fields of a request class (dataclass or Struct), read from io_struct.py, bases included."""
        tree = ast.parse((self.package / "srt/managers/io_struct.py").read_text())
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

        def fields(name: str) -> set[str]:
            node = classes[name]
            own = {stmt.target.id for stmt in node.body
                   if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in classes:
                    own |= fields(base.id)
            return own
        return fields(class_name)

    # -- /generate -------------------------------------------------------------

    @cached_property
    def _api_types(self) -> types.ModuleType:
        """The msgspec types of SGLang's JSON schema (generated; imports only msgspec)."""
        return _load_file("sglang.api.v1.api_types", self.package / "api/v1/api_types.py")

    @cached_property
    def _api_contract(self) -> types.ModuleType:
        assert self._api_types  # what api_contract.py imports
        return _load_file("sglang.srt.entrypoints.api_contract", self.package / "srt/entrypoints/api_contract.py")

    def generate_contract_error(self, body: Any) -> str | None:
        """What SGLang's `/generate` refuses in `body` before serving it (None: nothing)."""
        return self._api_contract.generate_contract_error(body)

    def generate_response_error(self, output: Any) -> str | None:
        """What in one `/generate` output object breaks SGLang's response schema (None: nothing)."""
        api_types = self._api_types
        try:
            api_types.GenerateResponse.from_json_value(output)
        except api_types.JsonContractError as err:
            return str(err)
        return None

    def response_fields(self, type_name: str) -> set[str]:
        """The fields of a response type of SGLang's JSON schema (e.g. GenerateMetaInfo)."""
        import msgspec

        return {field.name for field in msgspec.structs.fields(getattr(self._api_types, type_name))}


def _route(decorator: ast.expr, handler: ast.FunctionDef | ast.AsyncFunctionDef) -> Route | None:
    """`@app.get(path)`, `@app.post(path)` or `@app.api_route(path, methods=[...])` as a Route."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and isinstance(decorator.func.value, ast.Name) and decorator.func.value.id == "app"):
        return None
    kind = decorator.func.attr
    if kind not in ("get", "post", "put", "delete", "api_route") or not decorator.args:
        return None
    path = decorator.args[0]
    if not (isinstance(path, ast.Constant) and isinstance(path.value, str)):
        return None  # a path taken from the environment
    if kind == "api_route":
        methods = next((ast.literal_eval(k.value) for k in decorator.keywords if k.arg == "methods"), ["GET"])
    else:
        methods = [kind.upper()]
    return Route(path.value, frozenset(methods), _body_class(handler))


def _body_class(handler: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    for arg in handler.args.args:
        annotation = arg.annotation
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            annotation = annotation.slice.elts[0]
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Optional":
            annotation = annotation.slice
        if isinstance(annotation, ast.Name) and annotation.id.endswith(("ReqInput", "Req", "ReqOutput")):
            return annotation.id
    return None


def _is_light_import(node: ast.Import | ast.ImportFrom) -> bool:
    """Imports the request classes need that load without a GPU stack."""
    if isinstance(node, ast.ImportFrom):
        return node.module in ("__future__", "typing", "dataclasses", "enum", "sglang.srt.utils.msgspec_utils",
                               "sglang.srt.utils.weight_versions")
    return all(alias.name in ("msgspec", "copy", "logging", "uuid", "pickle") for alias in node.names)


def _is_struct_request(node: ast.ClassDef, defined: dict[str, ast.AST]) -> bool:
    """A msgspec request: derives (perhaps through other classes of the file) from BaseReq."""
    for base in node.bases:
        if isinstance(base, ast.Name):
            if base.id == "BaseReq":
                return True
            parent = defined.get(base.id)
            if isinstance(parent, ast.ClassDef) and _is_struct_request(parent, defined):
                return True
    return False
