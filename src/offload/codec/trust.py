"""Which functions a stored task may name: the trust boundary of a durable store.

A durable store holds a function as its dotted path (`module:qualname`), and whoever can
write the store can write any path. JSON instead of pickle stops arbitrary objects, not
arbitrary functions; so a stored task may not name a function of Python's standard
library (`os:system`, `subprocess:run`, `builtins:exec` and their like), nor reach one
through another module (the module a loaded function says it is defined in is checked
too). Functions of the application and of installed packages remain nameable, unless the
offloader trusts fewer (`Trust`): only functions registered with `@offload.task`, or only
those of given modules, checked before anything is imported.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
import sysconfig
from collections.abc import Callable
from typing import Any, cast

from ..errors import NotSerializable

__all__ = [
    "TRUST_ANY",
    "Trust",
    "callable_path",
    "name_of",
    "register",
    "registered",
    "resolve_callable",
    "resolve_task_function",
    "task_function_path",
]

_PATH = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*:[^\W\d]\w*(\.[^\W\d]\w*)*$")


def name_of(fn: Any) -> str:
    """`module.qualname` of a callable, for messages; never raises."""
    try:
        qualname = getattr(fn, "__qualname__", None)
        module = getattr(fn, "__module__", None)
        if isinstance(qualname, str):
            return f"{module}.{qualname}" if isinstance(module, str) else qualname
    except Exception:  # naming must never fail
        pass
    kind = type(fn)
    return f"{kind.__module__}.{kind.__qualname__} object"


def callable_path(fn: Callable[..., Any]) -> str:
    """`module:qualname` for a function another process can import; else NotSerializable.

    Refused: lambdas, functions defined inside functions, bound methods of instances,
    partials and callable objects, builtin methods without a module, and anything whose
    path imports back as a different object. Classmethods and staticmethods are fine.
    A function in `__main__` is accepted only when the program was started with
    `python -m package.module` (the path then names that module); a script run by file
    name cannot be imported by the `offload worker` process, so it is refused.
    """
    name = name_of(fn)
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(fn, functools.partial):
        raise NotSerializable(
            f"{name} is a functools.partial; pass the function and its arguments instead"
        )
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise NotSerializable(f"{name} has no importable module path; pass a module-level function")
    if "<lambda>" in qualname:
        raise NotSerializable(f"{name} is a lambda; pass a module-level function")
    if "<locals>" in qualname:
        raise NotSerializable(
            f"{name} is defined inside a function, so another process cannot import it; "
            "move it to module level"
        )
    if inspect.ismethod(fn) and not inspect.isclass(fn.__self__):
        raise NotSerializable(
            f"{name} is a method bound to an instance, which cannot be stored; "
            "pass a module-level function and the data it needs as arguments"
        )
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        spec_name = getattr(spec, "name", None)
        if not spec_name or spec_name.rpartition(".")[2] == "__main__":
            raise NotSerializable(
                f"{qualname} is defined in the __main__ script, which another process "
                "cannot import; move it into a module"
            )
        # Not imported to check: importing the main module a second time would run it again.
        return f"{spec_name}:{qualname}"
    path = f"{module}:{qualname}"
    try:
        resolved = resolve_callable(path)
    except ValueError as exc:
        raise NotSerializable(f"{name} cannot be imported back from {path!r}: {exc}") from None
    if resolved is not fn and resolved != fn:
        raise NotSerializable(
            f"{path!r} imports as a different object than {name} (rebound or decorated?)"
        )
    return path


def task_function_path(fn: Callable[..., Any]) -> str:
    """`callable_path` of a function a stored task performs: not one of Python's own."""
    path = callable_path(fn)
    if _in_standard_library(path.partition(":")[0]):
        raise NotSerializable(
            f"{name_of(fn)} is in Python's standard library, whose functions a stored task "
            "may not name (a row naming os:system would run it); call it from a function "
            "of your own"
        )
    return path


def resolve_task_function(path: str) -> Callable[..., Any]:
    """`resolve_callable` for a stored task's function; ValueError for one of Python's own:
    whoever can write a store can name any function, and these (os:system,
    subprocess:run, builtins:exec, ...) would hand them the machine at once."""
    if isinstance(path, str) and _in_standard_library(path.partition(":")[0]):
        raise ValueError(
            f"{path!r} is in Python's standard library, whose functions a stored task may not name"
        )
    if isinstance(path, str) and path.partition(":")[0] == "__main__":
        # Never written (callable_path names the module, or refuses a script), and it
        # would name whatever started this process.
        raise ValueError(f"{path!r} names the main module, which a stored task may not name")
    fn = resolve_callable(path)
    # Where the function is defined, not only the path: `mymodule:os.system`, or a module
    # that imports `system` from os, must not reach it. (An alias or a re-export of one of
    # the application's own functions is fine.)
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str) or _in_standard_library(module):
        raise ValueError(
            f"{path!r} leads to {name_of(fn)}, a function of Python's standard library (or "
            "of no module), which a stored task may not name"
        )
    return fn


def _in_standard_library(module: str) -> bool:
    """True for `os`, `subprocess.x`, `builtins`, `_testcapi`, and Python's own test suite:
    a module of Python itself."""
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top.startswith("_test") or _is_python_test_suite(top)


@functools.lru_cache(maxsize=64)
def _is_python_test_suite(top: str) -> bool:
    """True for `test` where it is the package installed with Python (not in
    `sys.stdlib_module_names`), False for an application's own package of that name."""
    if top != "test":
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    if not isinstance(origin, str) or not origin:
        return False
    where = os.path.realpath(origin)
    paths = sysconfig.get_paths()

    def under(key: str) -> bool:
        return where.startswith(os.path.realpath(paths[key]) + os.sep)

    # site-packages may lie inside the standard library's directory: an installed `test`
    # package of someone's is not Python's.
    return under("stdlib") and not (under("purelib") or under("platlib"))


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import the callable a `module:qualname` path names; ValueError if it cannot."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise ValueError(f"not a 'module:qualname' function path: {path!r}")
    module_name, _, qualname = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in qualname.split("."):
            target = getattr(target, attr)
    except Exception as exc:  # any import failure means "cannot resolve"
        raise ValueError(f"cannot resolve {path!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise ValueError(f"{path!r} is not callable")
    return cast("Callable[..., Any]", target)


# -- the registry, and what an offloader trusts -----------------------------------------

_registry: dict[str, Callable[..., Any]] = {}


def register(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`@offload.task`: register a module-level function by its path, for offloaders that
    perform only registered functions (`trusted="registered"`); returns it unchanged."""
    if not callable(fn):
        raise TypeError(f"@offload.task decorates a function, got {fn!r}")
    _registry[_registered_path(fn)] = fn
    return fn


def _registered_path(fn: Callable[..., Any]) -> str:
    """`module:qualname` of a function being defined (not importable back yet: the
    decorator runs before its module binds the name); NotSerializable as callable_path."""
    name = name_of(fn)
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if (
        not isinstance(module, str)
        or not isinstance(qualname, str)
        or isinstance(fn, functools.partial)
    ):
        raise NotSerializable(f"@offload.task registers module-level functions, not {name}")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise NotSerializable(
            f"@offload.task registers module-level functions; {name} is defined inside a "
            "function or is a lambda"
        )
    if module == "__main__":
        spec_name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
        if not spec_name or spec_name.rpartition(".")[2] == "__main__":
            raise NotSerializable(
                f"{qualname} is defined in the __main__ script, which a worker cannot import; "
                "move it into a module"
            )
        module = spec_name
    path = f"{module}:{qualname}"
    if _in_standard_library(module):
        raise NotSerializable(f"{path!r} is in Python's standard library; wrap it")
    return path


def registered() -> dict[str, Callable[..., Any]]:
    """A copy of the registry: path -> function."""
    return dict(_registry)


class Trust:
    """Which functions a stored task may name, for one offloader and its store.

    `"any"` (the default): any importable function outside the standard library.
    `"registered"`: only functions registered with `@offload.task` in this process; a
    stored task naming another is refused without importing anything. A tuple of module
    prefixes (`("myapp.tasks",)`): only functions of those modules (and their
    submodules), checked before the module is imported, and where the function found
    is defined (`myapp.tasks:requests.post` is requests' function, refused).
    """

    __slots__ = ("mode", "prefixes")

    def __init__(self, trusted: Any = "any") -> None:
        self.mode: str = "any"
        self.prefixes: tuple[str, ...] = ()
        if trusted in ("any", "registered"):
            self.mode = trusted
            return
        if isinstance(trusted, str) or not isinstance(trusted, (tuple, list, frozenset, set)):
            raise ValueError(
                "trusted must be 'any', 'registered' or a sequence of module prefixes "
                f"('myapp.tasks', ...), got {trusted!r}"
            )
        prefixes = tuple(trusted)
        bad = [p for p in prefixes if not isinstance(p, str) or not _MODULE.match(p)]
        if not prefixes or bad:
            raise ValueError(
                f"trusted: module prefixes must be dotted module names, got {bad or prefixes!r}"
            )
        self.mode, self.prefixes = "prefixes", prefixes

    @classmethod
    def of(cls, value: Any) -> Trust:
        return value if isinstance(value, Trust) else cls(value)

    @classmethod
    def parse(cls, text: str, what: str = "OFFLOAD_TRUSTED") -> Trust:
        """'any', 'registered' or comma-separated module prefixes; ValueError naming `what`."""
        text = text.strip()
        close = difflib.get_close_matches(text, ("any", "registered"), 1, 0.75)
        if close and text != close[0]:
            raise ValueError(f"{what}={text!r}: did you mean {close[0]!r}?")
        try:
            if text in ("any", "registered"):
                return cls(text)
            return cls(tuple(p.strip() for p in text.split(",") if p.strip()))
        except ValueError as exc:
            raise ValueError(f"{what}={text!r}: {exc}") from None

    def allows(self, path: str) -> bool:
        """True if a stored task may name `path` (`module:qualname`); imports nothing."""
        if self.mode == "any":
            return True
        if self.mode == "registered":
            return path in _registry
        return self._within(path.partition(":")[0])

    def _within(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.prefixes)

    def refusal(self, path: str) -> str:
        if self.mode == "registered":
            return (
                f"{path!r} is not registered with @offload.task, and this offloader performs "
                "only registered functions (trusted='registered'); its module was not imported"
            )
        return (
            f"{path!r} is outside the trusted modules {', '.join(self.prefixes)}; its module "
            "was not imported"
        )

    def resolve(self, path: str) -> Callable[..., Any]:
        """The function a stored task names, if it is trusted; ValueError otherwise (and
        nothing imported)."""
        if not isinstance(path, str):  # a tampered record's
            raise ValueError(f"not a 'module:qualname' function path: {path!r}")
        if not self.allows(path):
            raise ValueError(self.refusal(path))
        if self.mode == "registered":
            return _registry[path]
        fn = resolve_task_function(path)
        # Where the function is defined, too: `myapp.tasks:requests.post` walks out of a
        # trusted module into a package it imports.
        module = getattr(fn, "__module__", None)
        if self.mode == "prefixes" and not (isinstance(module, str) and self._within(module)):
            raise ValueError(
                f"{path!r} leads to {name_of(fn)}, which is outside the trusted modules "
                f"{', '.join(self.prefixes)}"
            )
        return fn

    def resolve_type(self, path: str) -> Callable[..., Any]:
        """The class a stored retry policy's `retry_on` names (`resolve_callable`). Under
        'registered' or module prefixes, a module neither trusted nor already imported is
        not imported for it (ValueError): importing runs the module's code."""
        module = path.partition(":")[0] if isinstance(path, str) else ""
        if self.mode != "any" and module not in sys.modules and not self._within(module):
            raise ValueError(
                f"retry_on names {path!r}, whose module is not imported in this process "
                f"and is not trusted ({self!r}); it was not imported"
            )
        return resolve_callable(path)

    def check(self, fn: Callable[..., Any]) -> None:
        """NotSerializable when an enqueue names a function this offloader would refuse to
        perform (found now rather than as a dead letter later)."""
        if self.mode == "any":
            return
        path = task_function_path(fn)
        if not self.allows(path):
            raise NotSerializable(self.refusal(path))

    def __repr__(self) -> str:
        return f"Trust({self.prefixes!r})" if self.mode == "prefixes" else f"Trust({self.mode!r})"


_MODULE = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*$")
TRUST_ANY = Trust()
