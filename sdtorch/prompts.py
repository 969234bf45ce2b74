"""AUTOMATIC1111's prompt syntax, as pure text: weights, schedules, `AND` and `<lora:...>` tags.

The behaviour is A1111's `modules/prompt_parser.py` (v1.10) and `modules/extra_networks.py`,
re-implemented here from their documented behaviour and doctests (A1111 is AGPL; no code is taken):

- `parse_prompt_attention`: `(x)` x1.1, `[x]` /1.1, `(x:w)`, nesting multiplies, unclosed brackets
  closed at the end, escapes, `BREAK`, adjacent equal weights merged.
- `prompt_schedules`: prompt editing `[from:to:when]`, `[to:when]`, `[from::when]` and alternation
  `[a|b]`, as (end_step, text) pairs per prompt (A1111's `get_learned_conditioning_prompt_schedules`).
- `split_and`: composable diffusion, `a cat AND a dog :0.5` (A1111's `get_multicond_prompt_list`).
- `parse_extra_networks`: `<lora:name:0.8>` tags taken out of the prompt (A1111's `extra_networks`).

A1111 reads a prompt in this order: extra-network tags out, `AND` split, schedules per sub-prompt,
then attention weights on each scheduled text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sdtorch.errors import SdtorchError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # how A1111 marks BREAK among the weighted pieces

# ---------------------------------------------------------------------------------------------
# Attention weights

# One token of the weight syntax, tried in this order (A1111's re_attention, restated):
_ATTENTION_TOKENS = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]|\\)              # \( \) \[ \] \\ are literal; a lone backslash vanishes
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)         # ':1.2)' closes a '(' with that weight
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)                # a run of text, or a colon that weighs nothing
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`text` -> [(piece, weight)], equal to A1111's `parse_prompt_attention` (its doctests are tests).

    Each closing bracket multiplies the weights of everything since its opening bracket, in the
    order the brackets close (so the floats equal A1111's, e.g. 1.3*1.1*1.1 = 1.5730000000000004);
    brackets still open at the end are closed then, every `(` first, then every `[`. A `)` or `]`
    with nothing open is text. `BREAK` (a whole word, outside brackets) becomes ("BREAK", -1.0);
    inside brackets it is multiplied like any piece, as in A1111, and is then just a word.
    A weight that is not a number, `(x:1.2.3)`, is an error (A1111 raises there too).
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ATTENTION_TOKENS.finditer(text):
        token = m.group(0)
        if m.group("escape"):
            pieces.append([token[1:], 1.0])
        elif m.group("open"):
            (open_round if token == "(" else open_square).append(len(pieces))
        elif m.group("weight") is not None and open_round:
            try:
                factor = float(m.group("weight"))
            except ValueError:
                raise SdtorchError(
                    f"prompt weight {m.group('weight')!r} in {token!r} is not a number; write (text:1.2)"
                ) from None
            scale(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, a lone colon, a weight or bracket with nothing open: literal, split at BREAK
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# ---------------------------------------------------------------------------------------------
# Schedules: prompt editing and alternation
#
# A1111 parses these with a lark grammar (Earley). A hand-written recursive-descent parser reads
# the same language here:
#   start     := (item | stray)*           stray: one of [ ] ( ) : that no item takes, kept as text
#   prompt    := item*                     (inside brackets: no strays)
#   item      := plain | "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#              | "[" [prompt ":"] prompt ":" NUMBER "]"  (whitespace allowed around NUMBER)
#              | "[" prompt ("|" prompt?)+ "]"
#   plain     := run of characters other than \ [ ] ( ) : |, or a backslash and any character
# Emphasis brackets and strays stay in the text (the attention parser reads them later). A prompt
# that does not parse (a '|' outside an alternation, a trailing backslash) is used as it is.
# Where A1111's grammar allows several readings of malformed bracket runs (e.g. '[a:b:3]]:5]'),
# lark's choice rests on its forest's set order; here the leftmost bracket that parses as an item
# always does.

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# lark's SIGNED_NUMBER: [+-] then INT "e" exponent | decimal with optional exponent | INT.
_NUMBER = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None
    after: tuple
    number: str  # as written: a '.' makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple


class _ScheduleParser:
    """Recursive descent over one prompt; each method returns (node, end) or None where it cannot parse."""

    def __init__(self, text: str):
        self.text = text

    def start(self) -> tuple | None:
        nodes: list = []
        i, n = 0, len(self.text)
        while i < n:
            parsed = self.item(i)
            if parsed is not None:
                nodes.append(parsed[0])
                i = parsed[1]
            elif self.text[i] in "[]():":
                nodes.append(self.text[i])  # a stray bracket or colon is text
                i += 1
            else:
                return None  # '|' outside an alternation, a backslash at the very end
        return tuple(nodes)

    def prompt(self, i: int) -> tuple[tuple, int]:
        nodes = []
        while (parsed := self.item(i)) is not None:
            nodes.append(parsed[0])
            i = parsed[1]
        return tuple(nodes), i

    def item(self, i: int):
        text = self.text
        if i >= len(text):
            return None
        if m := _PLAIN.match(text, i):
            return m.group(0), m.end()
        if text[i] == "(":
            return self.round(i)
        if text[i] == "[":
            return self.square(i)
        return None

    def round(self, i: int):
        inner, j = self.prompt(i + 1)
        if self.text.startswith(")", j):
            return ("(", *inner, ")"), j + 1
        if self.text.startswith(":", j):
            second, k = self.prompt(j + 1)
            if self.text.startswith(")", k):
                return ("(", *inner, ":", *second, ")"), k + 1
        return None

    def square(self, i: int):
        text = self.text
        first, j = self.prompt(i + 1)
        if text.startswith("]", j):
            return ("[", *first, "]"), j + 1
        if text.startswith("|", j):
            options = [first]
            while text.startswith("|", j):
                option, j = self.prompt(j + 1)
                options.append(option)
            if text.startswith("]", j):
                return _Alternate(tuple(options)), j + 1
            return None
        if text.startswith(":", j):
            if m := _NUMBER.match(text, j + 1):  # [to:when]
                return _Scheduled(None, first, m.group(1)), m.end()
            second, k = self.prompt(j + 1)
            if text.startswith(":", k) and (m := _NUMBER.match(text, k + 1)):  # [from:to:when]
                return _Scheduled(first, second, m.group(1)), m.end()
        return None


def _switch_step(number: str, steps: int) -> int:
    """A1111's reading of `when`: with a '.', a fraction of the steps; else a step; at most `steps`."""
    value = float(number) * steps if "." in number else float(number)
    return min(steps, int(value))


def _collect_steps(nodes, steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = _switch_step(node.number, steps)
            if when >= 1:
                found.add(when)
            _collect_steps(node.before or (), steps, found)
            _collect_steps(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _collect_steps(option, steps, found)
        elif isinstance(node, tuple):
            _collect_steps(node, steps, found)


def _render(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= _switch_step(node.number, steps) else node.after
            out.append(_render(chosen, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(_render(node, step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_step, text)]: `text` is the prompt for steps up to and including `end_step` (1-based),
    as A1111's `get_learned_conditioning_prompt_schedules([prompt], steps)[0]` (no hires pass).

    `[from:to:when]` shows `from` while step <= when, then `to`; `when` with a '.' is a fraction of
    `steps` (0.5 of 20 -> 10), else a step count; `[to:when]` and `[from::when]` leave one side
    empty. `[a|b|c]` takes a, b, c in turn, one per step. Steps are 1 to `steps`.
    """
    if steps < 1:
        raise SdtorchError(f"steps must be at least 1 for a prompt schedule, got {steps}")
    try:
        tree = _ScheduleParser(prompt).start()
    except RecursionError:  # brackets nested past Python's stack: used as it is, like a prompt that fails to parse
        tree = None
    if tree is None:
        return [(steps, prompt)]
    ends = {steps}
    _collect_steps(tree, steps, ends)
    return [(end, _render(tree, end, steps)) for end in sorted(ends)]


def prompt_schedules(prompts: list[str], steps: int) -> list[list[tuple[int, str]]]:
    """`prompt_schedule` of each prompt (A1111's `get_learned_conditioning_prompt_schedules`)."""
    cache = {p: prompt_schedule(p, steps) for p in set(prompts)}
    return [cache[p] for p in prompts]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text a schedule gives at 1-based `step`: the first entry whose end is >= step, or the
    first entry when none is (A1111's `reconstruct_cond_batch`)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1]


# ---------------------------------------------------------------------------------------------
# AND: composable diffusion (Liu et al. 2022, "Compositional Visual Generation with Composable
# Diffusion Models"); A1111 splits the positive prompt at the word AND.

_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """'a cat AND a dog :0.5' -> [('a cat', 1.0), (' a dog', 0.5)], as A1111's
    `get_multicond_prompt_list` reads one prompt: split at the word AND, a trailing ':number'
    is that part's weight (default 1), trailing whitespace dropped, leading whitespace kept."""
    parts = []
    for sub in _AND.split(prompt):
        m = _SUBPROMPT_WEIGHT.search(sub)
        text, weight = m.groups() if m else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


# ---------------------------------------------------------------------------------------------
# Extra networks: <lora:name:0.8>, <hypernet:...>

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name:arg:...>` tag. `positional` excludes the name; `key=value` args go to `named`."""

    kind: str
    name: str
    positional: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)

    def lora_weights(self) -> tuple[float, float]:
        """(text-encoder, UNet) multipliers as A1111's Lora extension reads them:
        `<lora:n:w>` both w; `<lora:n:te:unet>`; `te=`/`unet=` named; missing weight 1."""
        try:
            te = float(self.named.get("te", self.positional[0] if self.positional else 1.0))
            default_unet = self.positional[1] if len(self.positional) > 1 else te
            unet = float(self.named.get("unet", default_unet))
        except ValueError:
            raise SdtorchError(
                f"<{self.kind}:{self.name}:...>: weight is not a number; write <{self.kind}:{self.name}:0.8>"
            ) from None
        return te, unet


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Take every `<kind:name[:args]>` tag out of `prompt` (A1111's `extra_networks.parse_prompt`):
    returns the text without them and the tags in order. A1111 reads them from the positive prompt."""
    found: list[ExtraNetwork] = []

    def take(m: re.Match) -> str:
        name, *args = m.group(2).split(":")
        pairs = [a.split("=") for a in args]  # A1111: exactly one '=' makes a named argument
        positional = tuple(a for a, pair in zip(args, pairs) if len(pair) != 2)
        named = {pair[0]: pair[1] for pair in pairs if len(pair) == 2}
        found.append(ExtraNetwork(m.group(1), name, positional, named))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found
