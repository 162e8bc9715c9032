"""Answer extraction and matching for generated solutions: the final answer of a free-text generation (a boxed
expression, "the answer is ...", or the last number) and whether it equals the reference (numbers compared as exact
fractions within a relative tolerance, text after normalisation).

Pure Python (standard library only), so scoring runs on machines without torch, e.g. on saved generations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["answers_match", "extract_answer", "normalize_answer"]

# Relative tolerance used when two answers are both numeric.
REL_TOL = 1e-6

# --------------------------------------------------------------------------------------------------------------------
# Brace helpers
# --------------------------------------------------------------------------------------------------------------------


def _match_brace(text: str, open_idx: int) -> int | None:
    """Return the index of the ``}`` closing the ``{`` at ``open_idx``, or None if it is never closed.

    Escaped braces (``\\{`` / ``\\}``) are literal characters in LaTeX and must not change the depth, otherwise
    answers such as ``\\boxed{\\{1, 2\\}}`` would be cut short.
    """
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _unwrap_commands(text: str, commands: Sequence[str]) -> str:
    """Replace ``\\cmd{content}`` by ``content`` for each command name, honouring nested braces.

    Formatting wrappers like ``\\text{...}`` carry no mathematical meaning, so ``\\text{east}`` and ``east`` should
    compare equal. An unterminated wrapper is left untouched rather than guessed at.
    """
    pattern = re.compile(r"\\(?:" + "|".join(re.escape(c) for c in commands) + r")(?![A-Za-z])\s*\{")
    pos = 0
    while True:
        m = pattern.search(text, pos)
        if m is None:
            return text
        open_idx = m.end() - 1
        close_idx = _match_brace(text, open_idx)
        if close_idx is None:
            pos = m.end()
            continue
        text = text[: m.start()] + text[open_idx + 1 : close_idx] + text[close_idx + 1 :]
        pos = m.start()


# --------------------------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*(\{)?")
_ANSWER_KEY_RE = re.compile(r"\banswers?\b\s*(?:is\s*:?|:|=)\s*", re.IGNORECASE)
# A sentence ends at a period followed by whitespace or the end of the text; "3.5" is therefore not cut.
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_TRAILING_PUNCT = ".,;:!?"
_NUMBER_BODY = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_LAST_NUMBER_RE = re.compile(
    r"-?\\[dt]?frac\{-?[0-9]+\}\{[0-9]+\}"  # a LaTeX fraction is one number, not two
    r"|(?<![A-Za-z0-9_.])-?" + _NUMBER_BODY + r"(?:/[0-9]+(?:\.[0-9]+)?)?"
)
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})


def _unwrap_whole_box(content: str) -> str:
    """Peel ``\\boxed{\\boxed{x}}`` down to ``x``: a box that only wraps another box adds nothing."""
    while True:
        m = _BOX_RE.match(content)
        if m is None or m.group(1) is None:
            return content
        if _match_brace(content, m.end() - 1) != len(content) - 1:
            return content
        content = content[m.end() : -1].strip()


def _find_last_box(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{}``/``\\fbox{}`` (outermost), or None.

    Models often restate or correct themselves, so the last box is the final answer. Boxes nested inside a box are
    part of its content; an unterminated box is skipped so that a truncated generation falls through to the other
    heuristics instead of yielding half an answer.
    """
    last: str | None = None
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return last
        if m.group(1) is None:
            # "\boxed 5" form (no braces): the answer is the next whitespace-delimited token.
            tok = re.match(r"\s*([^\s$]+)", text[m.end() :])
            if tok and m.group(0)[-1].isspace():
                content = tok.group(1).rstrip(_TRAILING_PUNCT)
                if content:
                    last = content
            pos = m.end()
            continue
        open_idx = m.end() - 1
        close_idx = _match_brace(text, open_idx)
        if close_idx is None:
            pos = m.end()
            continue
        content = _unwrap_whole_box(text[open_idx + 1 : close_idx].strip())
        if content:
            last = content
        pos = close_idx + 1


def _strip_math_delimiters(text: str) -> str:
    """Remove surrounding ``$``/``\\(\\)``/``\\[\\]``, markdown bold and trailing punctuation from a phrase."""
    prev = None
    while prev != text:
        prev = text
        text = text.strip().strip("*").strip()
        text = text.rstrip(_TRAILING_PUNCT).strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
                text = text[len(left) : len(text) - len(right)]
        if text.startswith("$") and text.count("$") == 1:
            text = text[1:]
        if text.endswith("$") and text.count("$") == 1:
            text = text[:-1]
    return text


def _answer_after_key(text: str) -> str | None:
    """Return the phrase following the last "answer is"/"answer:" marker, or None.

    Only the last marker counts: in "Final Answer: The final answer is 5" the second marker is the one that is
    directly followed by the value. If the marker ends its line, the next non-empty line is taken.
    """
    matches = list(_ANSWER_KEY_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    lines = rest.split("\n")
    first = lines[0].strip()
    if not first:
        first = next((ln.strip() for ln in lines[1:] if ln.strip()), "")
    if not first:
        return None
    if first.startswith("$"):
        # Take exactly the math span; anything after it ("I hope it is correct.") is commentary.
        inner = first.lstrip("$")
        n_open = len(first) - len(inner)
        end = inner.find("$" * n_open)
        if end >= 0:
            candidate = inner[:end]
        else:
            candidate = inner
    else:
        m = _SENTENCE_END_RE.search(first)
        candidate = first[: m.start()] if m else first
    candidate = _strip_math_delimiters(candidate)
    return candidate or None


def _last_number(text: str) -> str | None:
    """Return the last number-looking token (int, decimal, negative, 1,234, 3/4 or \\frac{3}{4}), or None."""
    last = None
    for m in _LAST_NUMBER_RE.finditer(text):
        last = m.group(0)
    return last


def extract_answer(text: str) -> str | None:
    """Pull the final answer out of a free-text solution, or None if it contains none.

    Why this order: an explicit ``\\boxed{}`` is the most deliberate signal a model gives, an "answer is" phrase is
    the next best, and the last number is a weak fallback for short numeric answers. Returning None (instead of "")
    lets callers tell "no answer" apart from an empty one.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.translate(_UNICODE_MINUS)
    boxed = _find_last_box(text)
    if boxed is not None:
        return boxed
    phrase = _answer_after_key(text)
    if phrase is not None:
        return phrase
    return _last_number(text)


# --------------------------------------------------------------------------------------------------------------------
# Normalisation and matching
# --------------------------------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"[+-]?" + _NUMBER_BODY + r"(?:e[+-]?[0-9]+)?")
_SIGNED = r"([+-]?" + _NUMBER_BODY + r")"
_FRAC_BRACED_RE = re.compile(r"([+-]?)\\frac\{" + _SIGNED + r"\}\{" + _SIGNED + r"\}")
_FRAC_SHORT_RE = re.compile(r"([+-]?)\\frac([0-9])([0-9])")
_SLASH_RE = re.compile(_SIGNED + r"/" + _SIGNED)
_ASSIGN_RE = re.compile(r"^(?:[a-z]|\\[a-z]+)(?:_\{?[a-z0-9]+\}?)?=(?!=)")
_TEXT_WRAPPERS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "boxed", "fbox")


def _parse_plain_number(s: str) -> Fraction | None:
    """Parse ``s`` as a single decimal number (thousands commas allowed) into an exact Fraction."""
    if not _NUM_RE.fullmatch(s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _parse_number(s: str) -> Fraction | None:
    """Parse an already-normalised string as a number, a/b, or \\frac{a}{b}; None if it is not purely numeric.

    Exact rationals make ``0.5``, ``1/2`` and ``\\frac{1}{2}`` land on the same canonical value without any
    floating-point noise.
    """
    value = _parse_plain_number(s)
    if value is not None:
        return value
    m = _FRAC_BRACED_RE.fullmatch(s) or _FRAC_SHORT_RE.fullmatch(s)
    if m is None:
        m2 = _SLASH_RE.fullmatch(s)
        if m2 is None:
            return None
        sign, num_s, den_s = "", m2.group(1), m2.group(2)
    else:
        sign, num_s, den_s = m.group(1), m.group(2), m.group(3)
    num, den = _parse_plain_number(num_s), _parse_plain_number(den_s)
    if num is None or den is None or den == 0:
        return None
    value = num / den
    return -value if sign == "-" else value


def _format_fraction(value: Fraction) -> str:
    """Canonical text for a rational: ``2`` for integers, reduced ``p/q`` otherwise."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _normalize_text(ans: str) -> str:
    """Strip presentation-only LaTeX and whitespace so that equal answers spell the same; no numeric folding."""
    s = str(ans).translate(_UNICODE_MINUS).strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", "", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;:> ]", "", s)
    s = re.sub(r"\\(?:displaystyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _unwrap_commands(s, _TEXT_WRAPPERS)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\u00b0", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s).lower()
    s = s.rstrip(".")
    while s.startswith("{") and _match_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    if s.count("=") == 1:
        s = _ASSIGN_RE.sub("", s)
    return s


def normalize_answer(ans: str) -> str:
    """Return a canonical form of an answer so that notational variants compare equal as strings.

    Why: models and reference solutions write the same value in many ways (``$\\dfrac{1}{2}$``, ``0.5``, ``1/2``,
    ``x = 0.5``, ``50\\%`` vs ``50``). Numeric answers are folded to an exact reduced rational (``2.0`` -> ``2``,
    ``0.5`` -> ``1/2``); everything else is lower-cased with whitespace and formatting commands removed.
    """
    if ans is None:
        return ""
    s = _normalize_text(ans)
    value = _parse_number(s)
    if value is not None:
        return _format_fraction(value)
    return s


def answers_match(pred: str | None, truth: str) -> bool:
    """Decide whether a predicted answer equals the reference one.

    Why: exact string comparison under-counts correct solutions; this compares normalised forms and, when both are
    numeric, their values within a relative tolerance of 1e-6 (so a rounded ``0.3333333`` matches ``1/3``).
    """
    if pred is None or truth is None:
        return False
    p, t = normalize_answer(str(pred)), normalize_answer(str(truth))
    if not p or not t:
        return False
    if p == t:
        return True
    pv, tv = _parse_number(p), _parse_number(t)
    if pv is None or tv is None:
        return False
    return abs(pv - tv) <= REL_TOL * max(abs(pv), abs(tv))
