"""AUTOMATIC1111's prompt syntax, in pure Python: emphasis weights, BREAK, prompt editing, alternation.

Two passes, as in AUTOMATIC1111 (`modules/prompt_parser.py`):

1. **Editing and alternation** (`prompt_schedule`): `[from:to:when]`, `[to:when]`, `[from::when]`
   and `[a|b|...]` turn one prompt into plain texts, each active until a step. `when` is a step
   count ("10") or, written with a decimal point, a fraction of the steps ("0.25", "1.0"). A prompt
   the grammar cannot parse (a stray `|`, a trailing backslash) is used whole at every step, as
   AUTOMATIC1111 does.
2. **Emphasis** (`parse_attention`): on each plain text, `(x)` multiplies the weight by 1.1,
   `(x:1.3)` by 1.3, `[x]` divides by 1.1, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; an
   unclosed bracket weighs everything after it; `BREAK` ends the current 75-token chunk.

The step convention is AUTOMATIC1111's: a schedule `[(end_step, text), ...]` is laid over the
number of denoiser calls (its sampling steps, twice that for second-order samplers), and the
conditioning for the call made after `n` earlier calls is the first entry with `end_step >= n`
(`schedule_index`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from coreml_sd.errors import InputError

ROUND = 1.1  # "(x)": one pair of parentheses multiplies the weight by this
SQUARE = 1 / 1.1  # "[x]"
BREAK_WEIGHT = -1.0  # the marker weight of a BREAK entry in `parse_attention`'s output

# ---------------------------------------------------------------------------------------------
# Emphasis


_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]?            # an escape: \( \) \[ \] \\ give the character; a lone \ gives nothing
    | [(\[]                  # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\) # ":1.3)" closes a round bracket with an explicit weight
    | [)\]]                  # a closing bracket
    | [^\\()\[\]:]+          # plain text
    | :                      # a colon that does not start a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (piece, weight) runs, AUTOMATIC1111's `parse_prompt_attention`.

    Adjacent runs of equal weight are merged; `("BREAK", -1.0)` marks a chunk break. As in
    AUTOMATIC1111, a BREAK inside brackets has its marker weight multiplied too, so it is then
    read as the word "BREAK" (with a negative weight) rather than as a break.
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:  # text, a lone ":" or an unmatched closing bracket
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", BREAK_WEIGHT])
                runs.append([part, 1.0])
    for start in round_open:  # unclosed brackets weigh everything after them
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)
    return _merge_equal_weights(runs or [["", 1.0]])


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"emphasis weight {text!r} is not a number; write it like (word:1.3)") from None


def _merge_equal_weights(runs: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = [runs[0]]
    for piece, weight in runs[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged]


def is_break(piece: str, weight: float) -> bool:
    return piece == "BREAK" and weight == BREAK_WEIGHT


def uses_emphasis(text: str) -> bool:
    """Whether `text` weighs any piece other than 1 (AUTOMATIC1111 then records "Emphasis")."""
    return any(w != 1.0 and not is_break(p, w) for p, w in parse_attention(text))


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation: a small recursive-descent parser over AUTOMATIC1111's grammar
#
#   start:     (prompt | stray bracket or colon)*
#   prompt:    (emphasized | scheduled | alternate | plain | whitespace)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled: "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
#   alternate: "[" prompt ("|" [prompt])+ "]"
#   plain:     ([^\\[]():|] | \\ any)+
#
# Brackets that do not form one of these are kept as text at the top level only; a "|" outside an
# alternation, or a backslash ending the prompt, makes the whole prompt unparsable.


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None for "[to:when]"
    after: tuple
    when: str  # the number as written: "." in it means a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of node tuples


class _NoParse(Exception):
    pass


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class _Parser:
    MAX_DEPTH = 150  # brackets nested deeper are read as text (Python's stack, not the grammar, is the limit)

    def __init__(self, text: str):
        self.text = text
        self.depth = 0

    def start(self) -> tuple:
        nodes, pos = [], 0
        while pos < len(self.text):
            items, pos = self.prompt(pos)
            nodes += items
            if pos < len(self.text):
                if self.text[pos] not in "[]():":  # "|" or a lone trailing backslash
                    raise _NoParse
                nodes.append(self.text[pos])  # a bracket that opens or closes nothing: text
                pos += 1
        return tuple(nodes)

    def prompt(self, pos: int) -> tuple[list, int]:
        """Items from `pos` until a character no item can start with (a bracket that fails stops too)."""
        items = []
        while pos < len(self.text):
            char = self.text[pos]
            if char in "([":
                try:
                    item, pos = self.bracket(pos)
                except _NoParse:
                    break
                items += item if isinstance(item, list) else [item]
                continue
            match = _PLAIN.match(self.text, pos)
            if not match:
                break
            items.append(match.group(0))
            pos = match.end()
        return items, pos

    def bracket(self, pos: int):
        if self.depth >= self.MAX_DEPTH:
            raise _NoParse
        self.depth += 1
        try:
            return self._bracket(pos)
        finally:
            self.depth -= 1

    def _bracket(self, pos: int):
        if self.text[pos] == "(":
            first, pos = self.prompt(pos + 1)
            if self.peek(pos) == ")":
                return ["(", *first, ")"], pos + 1
            if self.peek(pos) == ":":
                second, pos = self.prompt(pos + 1)
                if self.peek(pos) == ")":
                    return ["(", *first, ":", *second, ")"], pos + 1
            raise _NoParse
        first, pos = self.prompt(pos + 1)
        follow = self.peek(pos)
        if follow == "]":
            return ["[", *first, "]"], pos + 1
        if follow == "|":
            return self.alternate(first, pos)
        if follow == ":":
            return self.scheduled(first, pos + 1)
        raise _NoParse

    def alternate(self, first: list, pos: int):
        options = [tuple(first)]
        while self.peek(pos) == "|":
            option, pos = self.prompt(pos + 1)
            options.append(tuple(option))
        if self.peek(pos) != "]":
            raise _NoParse
        return _Alternate(tuple(options)), pos + 1

    def scheduled(self, first: list, pos: int):
        end = self.number_then_close(pos)
        if end is not None:  # "[to:when]"
            return _Scheduled(None, tuple(first), end[0]), end[1]
        second, pos = self.prompt(pos)
        if self.peek(pos) == ":":
            end = self.number_then_close(pos + 1)
            if end is not None:  # "[from:to:when]"
                return _Scheduled(tuple(first), tuple(second), end[0]), end[1]
        raise _NoParse

    def number_then_close(self, pos: int):
        pos = self.skip_space(pos)
        match = _NUMBER.match(self.text, pos)
        if not match:
            return None
        after = self.skip_space(match.end())
        return (match.group(0), after + 1) if self.peek(after) == "]" else None

    def skip_space(self, pos: int) -> int:
        match = _SPACE.match(self.text, pos)
        return match.end() if match else pos

    def peek(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""


def _when_step(when: str, steps: int, old_timelines: bool) -> int:
    """The last step of the "before" part: AUTOMATIC1111's reading of the number in `[a:b:when]`."""
    value = float(when)
    if old_timelines:  # before 1.6.0: any value under 1 was a fraction
        value = value * steps if value < 1 else value
    elif "." in when:
        value *= steps
    return int(max(-1.0, min(value, float(steps))))  # clamped first so that 1e999 cannot overflow


def _boundaries(nodes: tuple, steps: int, old_timelines: bool) -> set[int]:
    found = set()
    for node in nodes:
        if isinstance(node, _Scheduled):
            step = _when_step(node.when, steps, old_timelines)
            if step >= 1:
                found.add(step)
            found |= _boundaries(node.before or (), steps, old_timelines)
            found |= _boundaries(node.after, steps, old_timelines)
        elif isinstance(node, _Alternate):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _boundaries(option, steps, old_timelines)
    return found


def _render(nodes: tuple, step: int, steps: int, old_timelines: bool) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            before = step <= _when_step(node.when, steps, old_timelines)
            chosen = (node.before or ()) if before else node.after
            out.append(_render(chosen, step, steps, old_timelines))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps, old_timelines))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, *, old_timelines: bool = False) -> list[tuple[int, str]]:
    """[(end_step, text), ...]: each text is the prompt from the previous end step up to `end_step`.

    AUTOMATIC1111's `get_learned_conditioning_prompt_schedules` for one prompt; `steps` is the
    number of denoiser calls the schedule spans. `old_timelines`: AUTOMATIC1111's "Use old prompt
    editing timelines" (before 1.6.0, where "[a:b:1.0]" switched after step 1, not at the end).
    """
    if steps < 1:
        raise InputError(f"a prompt schedule needs at least 1 step; got {steps}")
    try:
        nodes = _Parser(prompt).start()
    except _NoParse:
        return [(steps, prompt)]
    ends = sorted(_boundaries(nodes, steps, old_timelines) | {steps})
    return [(end, _render(nodes, end, steps, old_timelines)) for end in ends]


def schedule_index(schedule: list[tuple[int, object]], calls_done: int) -> int:
    """Which entry conditions the denoiser call made after `calls_done` earlier calls.

    AUTOMATIC1111's `reconstruct_cond_batch`: the first entry whose end step is >= `calls_done`;
    past the last end step (a sampler that made more calls than planned) it is the first entry.
    """
    for index, (end, _) in enumerate(schedule):
        if calls_done <= end:
            return index
    return 0


def text_at_step(prompt: str, steps: int, calls_done: int, *, old_timelines: bool = False) -> str:
    """The plain text that conditions the denoiser call made after `calls_done` earlier calls."""
    schedule = prompt_schedule(prompt, steps, old_timelines=old_timelines)
    return schedule[schedule_index(schedule, calls_done)][1]
