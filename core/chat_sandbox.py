"""A model's chat template, rendered by Jinja in an immutable sandbox with bounded work.

A chat template comes with a model directory, from anyone: untrusted input. Jinja's sandbox keeps it
away from Python's internals and from mutating its inputs, and bounds range() (MAX_RANGE). What a
template may spend is bounded here:

- steps: every loop iteration (recursive loops too), call (macros, methods, globals) and filter
  counts, at most MAX_STEPS per render — nested loops and exponential macro recursion stop there;
- size: no value the template builds is larger than MAX_TEXT (see size(): a string's characters,
  a list's 8 per item plus its items, a shared item counted each time it appears, so `[x] * n`
  nested, the Jinja "billion laughs", is refused); operators, `~`, literals, filters and methods
  that can grow a value (`*`, `center`, `replace`, `join`, `format`, ...) are checked from their
  arguments before they run, every other filter's and call's result after;
- built: all the values one render builds, its written text (captured by macros and `{% set %}`
  blocks too) included, hold at most MAX_BUILT characters;
- time: a render stops after MAX_SECONDS, a backstop for work the counts above do not see
  (comparing long strings in a loop).

render() streams the output and stops as soon as it passes MAX_TEXT characters. A template over a
limit raises Exceeded, a SecurityError, within well under a second.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import json
import re
import string
import time

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace as _JinjaNamespace
from jinja2.visitor import NodeTransformer

MAX_TEXT = 1 << 20            # characters one render writes; characters or items one value holds
MAX_STEPS = 50_000            # loop iterations, calls and filters of one render
MAX_BUILT = 1 << 24           # characters (or items) of all the values one render builds
MAX_INT_BITS = 1 << 14        # bits of an integer a template computes
MAX_SECONDS = 2.0             # wall clock of one render
MAX_SOURCE = 1 << 18          # characters of a chat template's source
MAX_EXPONENT = 256

# Filters tune adds to every compiled template (names a template cannot write): see _Bound.
_ITERATE, _WRITE, _CONCAT, _VALUE = "tune-iterate", "tune-write", "tune-concat", "tune-value"


class Exceeded(jinja2.exceptions.SecurityError):
    """A render went over one of the limits; the message says what the template did."""


class _Budget:
    """What one render has spent."""
    __slots__ = ("steps", "built", "deadline", "sizes")

    def __init__(self) -> None:
        self.steps, self.built = 0, 0
        self.sizes: dict[int, tuple] = {}      # id → (list or dict, its size): see size()
        self.deadline = time.perf_counter() + MAX_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise Exceeded(f"did more than {MAX_STEPS:,} loop iterations, calls and filters")
        self.clock()

    def build(self, n: int, what: str) -> None:
        """Account for a value of n characters or items, before it is built."""
        if n > MAX_TEXT:
            raise Exceeded(f"built a value larger than 1 MB ({what}: {_more(n, MAX_TEXT)} "
                           "characters or items)")
        self.built += n
        if self.built > MAX_BUILT:
            raise Exceeded(f"built more than {MAX_BUILT:,} characters of text and lists")
        self.clock()

    def clock(self) -> None:
        if time.perf_counter() > self.deadline:
            raise Exceeded(f"ran for more than {MAX_SECONDS:g} s")


def _more(n: int, limit: int) -> str:
    return f"{n:,}" if n <= limit else f"more than {limit:,}"


_RENDER: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_render", default=None)


def _budget() -> _Budget:
    budget = _RENDER.get()
    if budget is None:
        # Jinja folds constant expressions while compiling; an error here leaves them to the
        # render, where the budget applies.
        raise Exceeded("ran outside render()")
    return budget


def size(value, limit: int = MAX_TEXT) -> int:
    """About how many characters str(value) has: a string its length, a list or dict its items'
    sizes plus their separators, a shared item each time it appears (as str() writes it). Stops
    counting past `limit`. A list or dict measured once in a render is not walked again: the
    sandbox keeps a template from changing them."""
    n = _leaf(value)
    if n is not None:
        return n
    budget = _RENDER.get()
    memo = budget.sizes if budget is not None else {}
    running = 0
    frames = [[value, _children(value), _own(value)]]     # [container, items left, size so far]
    running += frames[0][2]
    while frames:
        frame = frames[-1]
        for child in frame[1]:
            n = _leaf(child)
            if n is None:
                seen = memo.get(id(child))
                n = seen[1] if seen is not None and seen[0] is child else None
            if n is None:
                own = _own(child)
                frames.append([child, _children(child), own])
                running += own
                break
            frame[2] += n
            running += n
            if running > limit:
                return running
        else:
            frames.pop()
            if not isinstance(frame[0], _JinjaNamespace):     # a namespace can change
                memo[id(frame[0])] = (frame[0], frame[2])
            if not frames:
                return frame[2]
            frames[-1][2] += frame[2]
        if running > limit:
            return running
    return running


def _leaf(value) -> int | None:
    """The size of a value that holds no others; None for a list, dict or namespace."""
    kind = _LEAVES.get(type(value))
    if kind is not None:
        return len(value) if kind == 0 else 8 if kind == 1 else max(value.bit_length() // 3 + 1, 8)
    if type(value) in _CONTAINERS:
        return None
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset, dict, _JinjaNamespace)):
        return None
    if isinstance(value, int):
        return max(value.bit_length() // 3 + 1, 8)
    return 8


# exact types first (the common case, and fast): 0 sized by len(), 1 a scalar, 2 an integer
_LEAVES = {str: 0, bytes: 0, bytearray: 0, bool: 1, float: 1, type(None): 1, int: 2}
_CONTAINERS = frozenset((list, tuple, dict, set, frozenset))


def _own(value) -> int:
    """A container's brackets, and 8 per item (the memory of its slot, at least what str() writes
    for a separator and a short item)."""
    if isinstance(value, dict):
        return 2 + 16 * len(value)
    if isinstance(value, _JinjaNamespace):
        return 2 + 16 * len(object.__getattribute__(value, "_Namespace__attrs"))
    return 2 + 8 * len(value)


def _children(value):
    if isinstance(value, dict):
        return itertools.chain(value.keys(), value.values())
    if isinstance(value, _JinjaNamespace):
        return iter(list(object.__getattribute__(value, "_Namespace__attrs").values()))
    return iter(value)


def _text(value) -> str:
    """str(value), its size checked first (a list of shared items can be huge when written)."""
    if isinstance(value, str):
        return value
    n = size(value)
    if n > MAX_TEXT:
        raise Exceeded(f"built a value larger than 1 MB (written out: {_more(n, MAX_TEXT)} "
                       "characters)")
    return str(value)


# ------------------------------------------------------------------------------ growing operations

_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _numbers(values) -> int:
    """The largest integer among values (0 when none): a width a format may take from them."""
    return max([abs(v) for v in values if isinstance(v, int)] or [0])


def _printf_size(fmt: str, args) -> int:
    """An upper bound of len(fmt % args)."""
    values = list(args.values()) if isinstance(args, dict) else \
        list(args) if isinstance(args, tuple) else [args]
    widest = max([size(v) for v in values] or [0])
    total = len(fmt)
    for m in _PRINTF.finditer(fmt):
        width = max(int(g) if g and g.isdigit() else (_numbers(values) if g == "*" else 0)
                    for g in m.group(1, 2))
        total += width + widest + 32
    return total


def _format_size(fmt: str, args, kwargs) -> int:
    """An upper bound of len(fmt.format(*args, **kwargs))."""
    values = list(args) + list(kwargs.values())
    widest = max([size(v) for v in values] or [0])
    total = len(fmt)
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        spec = spec or ""
        width = max([int(d) for d in re.findall(r"\d+", spec)] or [0])
        if "{" in spec:
            width = max(width, _numbers(values))
        total += width + widest + 32
    return total


# str (and bytes) methods whose result can be much larger than the string and their arguments
_GROWING_METHODS = frozenset(("center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join",
                              "format", "format_map", "translate"))


def _method_size(method, args: tuple, kwargs: dict) -> tuple[int, tuple]:
    """(upper bound of the result's size, the arguments to call with) for a growing str method;
    (0, args) for any other call. join's iterable is read once, here, and passed on as a list."""
    method = getattr(method, "__wrapped__", method)     # the sandbox wraps str.format
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, (str, bytes)) or name not in _GROWING_METHODS:
        return 0, args
    n = len(owner)
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        return (max(n, width) if isinstance(width, int) else n), args
    if name == "expandtabs":
        tab = arg(0, "tabsize", 8)
        tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
        return (n + tabs * max(tab, 0) if isinstance(tab, int) else n), args
    if name == "replace":
        old, new, count = arg(0, "old"), arg(1, "new"), arg(2, "count", -1)
        if not isinstance(old, type(owner)) or not isinstance(new, type(owner)):
            return n, args
        hits = owner.count(old) if old else n + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        return n + hits * max(len(new) - len(old), 0), args
    if name == "join":
        items = list(args[0]) if args else []
        return n * max(len(items) - 1, 0) + size(items), (items,) + args[1:]
    if name == "translate":
        table = arg(0, "table")
        longest = max([size(v) for v in table.values()] or [1]) if isinstance(table, dict) else 1
        return n * max(longest, 1), args
    if name == "format_map":
        mapping = arg(0, "mapping")
        return _format_size(owner, (), dict(mapping) if isinstance(mapping, dict) else {}), args
    return _format_size(owner, args, kwargs), args


def _binop_size(operator: str, left, right) -> int:
    """An upper bound of the size of `left operator right` where it can be large; 0 otherwise."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints and right > 0:
        if right > MAX_EXPONENT or left.bit_length() * right > MAX_INT_BITS:
            raise Exceeded(f"computed a power with an exponent too large ({right})")
    elif operator == "*" and ints:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise Exceeded(f"built an integer of more than {MAX_INT_BITS:,} bits")
    elif operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                return size(seq, MAX_BUILT) * max(n, 0)
    elif operator == "+" and isinstance(left, (str, bytes, list, tuple)) \
            and isinstance(right, (str, bytes, list, tuple)):
        return size(left) + size(right)
    elif operator == "%" and isinstance(left, str):
        return _printf_size(left, right)
    return 0


def _filter_size(name: str, a: dict) -> int:
    """An upper bound of the size of what a growing filter returns (its bound arguments `a`,
    changed in place where an iterable must be read first); 0 for the others."""
    if name == "center":
        width = a.get("width")
        return max(size(a["value"]), width if isinstance(width, int) else 0)
    if name == "indent":
        width = a.get("width")
        width = width if isinstance(width, int) else size(width)
        text = _text(a["s"])
        return len(text) + (text.count("\n") + 1) * max(width, 0)
    if name == "wordwrap":
        n = size(a["s"])
        return n + (n + 1) * max(size(a.get("wrapstring") or "\n"), 1)
    if name == "replace":
        s = _text(a["s"])
        return _method_size(s.replace, (_text(a["old"]), _text(a["new"]),
                                        a["count"] if isinstance(a.get("count"), int) else -1),
                            {})[0]
    if name == "join":
        a["value"] = items = list(a["value"])
        joined = size(items) if a.get("attribute") is None else 0    # else: checked after
        return size(a.get("d") or "") * max(len(items) - 1, 0) + joined
    if name == "format":
        return _printf_size(_text(a["value"]), a.get("kwargs") or tuple(a.get("args") or ()))
    if name in ("batch", "slice"):
        count = a.get("linecount", a.get("slices"))
        return count if isinstance(count, int) else 0
    if name == "sum":
        start = a.get("start", 0)
        if not isinstance(start, (int, float)):
            raise Exceeded("used `sum` with a start that is not a number (adding lists or text "
                           "copies the whole sum at every item)")
        return 0
    if name == "round":
        precision = a.get("precision", 0)
        if isinstance(precision, int) and abs(precision) > 400:
            raise Exceeded(f"rounded to {precision} digits")
        return 0
    if name == "urlize":
        extra = size(a.get("target") or "") + size(a.get("rel") or "")
        return size(a["value"]) * (64 + extra)
    if name == "tojson":
        indent = a.get("indent")
        indent = indent if isinstance(indent, int) else size(indent or "")
        if indent > 16:
            raise Exceeded(f"indented tojson by {indent}")
        return 0
    return 0


_PASS_NAMES = ("eval_ctx", "environment", "env", "context")
_GROWING_FILTERS = frozenset(("center", "indent", "wordwrap", "replace", "join", "format", "batch",
                              "slice", "sum", "round", "urlize", "tojson"))


def _counted_filter(name: str, fn):
    """fn as a filter that counts a step, checks a growing filter's result size before it runs
    and every filter's result after."""
    signature = inspect.signature(fn) if name in _GROWING_FILTERS else None
    # Jinja passes a context/environment first to some filters whose signature (that of the
    # function they wrap) does not name it: that argument is kept out of the binding.
    skip = int(getattr(fn, "jinja_pass_arg", None) is not None and signature is not None
               and next(iter(signature.parameters), "") not in _PASS_NAMES)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        budget = _budget()
        budget.step()
        if signature is not None:
            bound = signature.bind(*args[skip:], **kwargs)
            bound.apply_defaults()
            budget.build(_filter_size(name, bound.arguments), f"the filter `{name}`")
            args, kwargs = args[:skip] + tuple(bound.args), bound.kwargs
        out = fn(*args, **kwargs)
        budget.build(size(out), f"the filter `{name}`")
        return out

    return run


# ------------------------------------------------------------------------------ tune's own filters

def _iterate(iterable):
    """A loop's items, one step each."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _write(value) -> str:
    """One piece of a template's output (streamed or captured), counted before it is written."""
    text = _text(value)
    _budget().build(len(text), "the output")
    return text


def _concat(values) -> str:
    """`a ~ b ~ ...`: the pieces' sizes checked before they are joined."""
    parts = [_text(v) for v in values]
    _budget().build(sum(map(len, parts)), "`~`")
    return "".join(parts)


def _value(value):
    """A list, tuple or dict literal: checked, since items may be large values shared many times."""
    _budget().build(size(value), "a list or dict literal")
    return value


class _Bound(NodeTransformer):
    """Routes a parsed template's loops, output, `~` and literals through tune's filters."""

    @staticmethod
    def _wrap(node, name: str):
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, _ITERATE)
        return node

    def visit_Output(self, node):
        self.generic_visit(node)
        node.nodes = [self._wrap(child, _WRITE) for child in node.nodes]
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return self._wrap(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)

    def visit_List(self, node):
        self.generic_visit(node)
        return self._wrap(node, _VALUE)

    visit_Dict = visit_List

    def visit_Tuple(self, node):
        self.generic_visit(node)
        return self._wrap(node, _VALUE) if node.ctx == "load" else node


# ------------------------------------------------------------------------------ the environment

class _Namespace(_JinjaNamespace):
    # no underscore attributes on namespaces (the door to Python internals)
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        _JinjaNamespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        _JinjaNamespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Generation(jinja2.ext.Extension):
    # {% generation %}...{% endgeneration %} marks assistant text for transformers' masks;
    # here it renders its body unchanged.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every loop, call, filter, operator and output counted and
    size-checked against the render's budget."""
    intercepted_binops = frozenset(("*", "**", "+", "%"))

    def _parse(self, source, name, filename):
        return _Bound().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        need = _binop_size(operator, left, right)
        if need:
            _budget().build(need, f"`{operator}`")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        budget = _budget()
        budget.step()
        if isinstance(__obj, LoopContext) and args:     # a recursive loop's next level
            args = (_iterate(args[0]),) + args[1:]
        need, args = _method_size(__obj, args, kwargs)
        if need:
            budget.build(need, f"`{getattr(__obj, '__name__', 'a call')}`")
        out = super().call(__context, __obj, *args, **kwargs)
        budget.build(size(out), f"`{getattr(__obj, '__name__', 'a call')}`")
        return out


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # like transformers: no HTML escaping
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def environment() -> BoundedEnvironment:
    """A fresh bounded environment with transformers' chat-template additions (tojson without HTML
    escaping, raise_exception, {% generation %}); no lipsum (it writes any amount of text)."""
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _counted_filter(name, fn) for name, fn in env.filters.items()}
    env.filters.update({_ITERATE: _iterate, _WRITE: _write, _CONCAT: _concat, _VALUE: _value})
    env.globals["raise_exception"] = _raise_exception
    env.globals["namespace"] = _Namespace
    env.globals.pop("lipsum", None)
    # No strftime_now: templates that print today's date (Llama 3.1) fall back to their fixed date,
    # so the rendered training data, and its cache key, do not change with the calendar.
    return env


def render(template: jinja2.Template, **variables) -> str:
    """The template rendered over `variables` within the budget; the output streamed and refused
    as soon as it passes MAX_TEXT characters."""
    token = _RENDER.set(_Budget())
    try:
        out, n = [], 0
        for piece in template.generate(**variables):
            n += len(piece)
            if n > MAX_TEXT:
                raise Exceeded(f"rendered more than {MAX_TEXT:,} characters")
            out.append(piece)
        return "".join(out)
    finally:
        _RENDER.reset(token)
