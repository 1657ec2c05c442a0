"""Final-answer extraction and equivalence checking for verifiable problems.

Equivalence is symbolic, not string match: `1/2`, `0.5` and `\\frac{1}{2}` agree, `x+1` and `1+x`
agree, `2` and `3` do not. math-verify (LaTeX and plain expressions -> sympy) does the heavy
lifting; a sympy difference check covers plain algebra it does not anchor on (parsed by latex2sympy's
grammar, never by Python `eval`: answers are model / teacher output), and a normalised string comparison
covers non-mathematical answers (names, words).
"""
from __future__ import annotations

import logging
import re
import threading

import sympy
from latex2sympy2_extended import latex2sympy

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse as mv_parse, verify as mv_verify

logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-call "timeout disabled" notes in threads

_BOXED = "\\boxed"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_SAFE_EXPR = re.compile(r"^[0-9a-zA-Z\s\.\+\-\*/\^\(\)]+$")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    i = text.rfind(_BOXED)
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k].strip()
    return None  # unbalanced: a truncated answer is no answer


def extract_final_answer(text: str) -> str | None:
    """The final answer of a solution: last <answer>...</answer>, else last \\boxed{...}, else None."""
    tags = _ANSWER_TAG.findall(text or "")
    if tags:
        inner = tags[-1].strip()
        return extract_boxed(inner) or inner
    return extract_boxed(text or "")


def normalize_text(ans: str) -> str:
    """Strip LaTeX wrappers, units of formatting and case so that textual answers compare fairly."""
    s = str(ans).strip()
    b = extract_boxed(s)
    if b is not None:
        s = b
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(mathrm|textbf|mathbf)\{([^}]*)\}", r"\2", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", " ").replace("\\%", "%")
    s = re.sub(r"^(the )?(final )?answer( is)?[:\s]*", "", s, flags=re.I)
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", " ", s).lower()
    return s


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv(ans: str):
    # math-verify's own timeouts use SIGALRM, which exists only in the main thread.
    kw = {"parsing_timeout": 5} if _in_main_thread() else {"parsing_timeout": None}
    s = ans.strip()
    if not (s.startswith("$") or "\\boxed" in s):
        s = f"${s}$"  # anchor plain expressions so the LaTeX extractor reads x+1, \frac{1}{2}, ...
    return mv_parse(s, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], **kw)


_ALLOWED_NAMES = {"sqrt", "pi", "exp", "log", "sin", "cos", "tan"}
_FUNC = re.compile(r"\b(sqrt|pi|exp|log|sin|cos|tan)\b")


def _plain_to_latex(s: str) -> str | None:
    """Plain algebra (`2*sqrt(3)/3`, `x^2+1`, `log(2)`) as LaTeX for latex2sympy; None if unbalanced."""
    out, i = [], 0
    while i < len(s):
        m = _FUNC.match(s, i) if (i == 0 or not (s[i - 1].isalnum() or s[i - 1] == "_")) else None
        if not m:
            out.append(s[i])
            i += 1
            continue
        name, i = m.group(1), m.end()
        if name != "sqrt":
            out.append({"log": "\\ln"}.get(name, "\\" + name) + " ")
            continue
        j = i
        while j < len(s) and s[j] == " ":
            j += 1
        if j >= len(s) or s[j] != "(":
            return None
        depth, k = 0, j
        for k in range(j, len(s)):
            depth += {"(": 1, ")": -1}.get(s[k], 0)
            if depth == 0:
                break
        if depth:
            return None
        inner = _plain_to_latex(s[j + 1:k])
        if inner is None:
            return None
        out.append("\\sqrt{" + inner + "}")
        i = k + 1
    return "".join(out)


def _sympy(ans: str):
    s = normalize_text(ans)
    if not s or len(s) > 200 or not _SAFE_EXPR.match(s):
        return None  # only plain arithmetic/algebra characters
    if any(len(n) > 1 and n not in _ALLOWED_NAMES for n in re.findall(r"[a-z_]\w*", s)):
        return None  # one-letter symbols and a few math functions only
    latex = _plain_to_latex(s)
    if latex is None:
        return None
    try:
        return latex2sympy(latex)
    except Exception:  # noqa: BLE001 - unparsable is simply "not an expression"
        return None


def answers_equivalent(pred: str | None, gold: str | None) -> bool:
    """True when pred and gold denote the same answer (numerically / symbolically / textually)."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    np_, ng = normalize_text(pred), normalize_text(gold)
    if not np_ or not ng:
        return False
    if np_ == ng:
        return True
    try:
        g, p = _mv(gold), _mv(pred)
        if g and p:
            kw = {"timeout_seconds": 5} if _in_main_thread() else {"timeout_seconds": None}
            if mv_verify(g, p, **kw):
                return True
    except Exception:  # noqa: BLE001 - fall through to the sympy check
        pass
    a, b = _sympy(pred), _sympy(gold)
    if a is None or b is None:
        return False
    try:
        diff = sympy.simplify(a - b)
        if diff == 0:
            return True
        return bool(diff.is_number and abs(complex(diff)) < 1e-6 * max(1.0, abs(complex(b)) if b.is_number else 1.0))
    except Exception:  # noqa: BLE001
        return False


def grade(solution_text: str, gold: str) -> tuple[bool, str | None]:
    """(correct, extracted answer) for a full solution text."""
    ans = extract_final_answer(solution_text)
    return answers_equivalent(ans, gold), ans
