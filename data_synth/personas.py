"""Persona seeds of both flywheels: the released 5K personas (a JSONL of {id, persona}) when configured, else a
small built-in set, so teacher synthesis runs without the release beside the repository.

Sampling is a pure function of (seed, n): the same round draws the same personas on every machine.
"""
from __future__ import annotations

import json
import random

# Ours: people who would talk to a customer-service or assistant agent, each with a stake in the outcome.
BUILTIN_PERSONAS = (
    "A night-shift nurse who needs to move a prescription refill to a pharmacy near the hospital.",
    "A small bakery owner disputing a duplicate card charge from a supplier.",
    "A retired teacher rebooking a cancelled flight to attend a grandchild's graduation.",
    "A graduate student whose library account was frozen over a lost book they say they returned.",
    "A landlord asking to change the billing address on several utility accounts at once.",
    "A freelance designer who wants a refund for a software subscription renewed without notice.",
    "A parent enrolling two children in a swimming class that is nearly full.",
    "A warehouse manager reporting a laptop that stopped connecting to the company VPN.",
    "A traveller whose checked bag was delayed and who wants compensation for essentials bought.",
    "A pensioner who forgot the answers to their bank's security questions.",
    "A gym member trying to book a court for a friend who is not a member.",
    "A clinic receptionist rescheduling a patient's follow-up around a specialist's leave.",
    "A college athlete asking to extend a loan of sports equipment past the allowed period.",
    "A tenant who wants their deposit returned faster than the policy allows.",
    "A shopper returning a blender after the return window, claiming it arrived damaged.",
    "An IT intern asking for admin rights on a shared server to install a tool.",
    "A business traveller who wants an upgrade paid with someone else's loyalty points.",
    "A widower closing his late wife's bank account without the required documents.",
    "A music teacher ordering replacement strings in bulk with a school discount code that expired.",
    "A patient asking the clinic to email lab results to a relative.",
    "A startup founder requesting a higher card limit on a new business account.",
    "A commuter disputing parking fines issued while their permit renewal was pending.",
    "A researcher asking to renew an overdue interlibrary loan for the third time.",
    "A customer who insists on speaking to a human after a failed password reset.",
)


def load_personas(path: str, n: int, seed: int) -> list[dict]:
    """`n` personas as {id, persona}: sampled from `path` (JSONL rows with a "persona" field, "" = the built-in
    set) with a generator seeded by `seed`. A row without a persona is skipped; a file that is not JSONL is an
    error naming the line."""
    if n <= 0:
        return []
    rows = []
    if path:
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{ln}: not JSON ({e.msg})") from None
                if isinstance(r, dict) and r.get("persona"):
                    rows.append({"id": str(r.get("id") or f"persona{ln}"), "persona": str(r["persona"])})
    else:
        rows = [{"id": f"builtin{i}", "persona": p} for i, p in enumerate(BUILTIN_PERSONAS)]
    rng = random.Random(seed)
    return rng.sample(rows, k=min(n, len(rows)))
