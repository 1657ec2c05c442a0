"""Library loans: renewals unless already renewed twice or on hold; long-overdue items go to a human."""
from __future__ import annotations

from pydantic import BaseModel

from agq_jax.envs.worlds import register
from agq_jax.envs.worlds.base import DomainSpec, Rule, owner_model, owner_verified_rule

TITLES = ["Dune", "Emma", "Beloved", "Ulysses", "Middlemarch", "Kindred", "Solaris", "Persuasion"]


class Loan(BaseModel):
    loan_id: str
    member_id: str
    title: str
    renewals_used: int
    holds: int
    overdue_days: int
    due_in_days: int


def _renew(loan: Loan, args: dict) -> dict:
    loan.renewals_used += 1
    loan.due_in_days += 7 * int(args["period"].split()[0])
    return {"loan_id": loan.loan_id, "status": "renewed", "due_in_days": loan.due_in_days}


SPEC = DomainSpec(
    name="library", agent_role="a library desk agent", entity="loan", id_field="loan_id", id_prefix="L",
    owner="member", owner_id_field="member_id", owner_prefix="M", record_model=Loan,
    owner_model=owner_model("member_id", "Member"),
    make_record=lambda rng: {"title": rng.choice(TITLES), "renewals_used": rng.randint(0, 1), "holds": 0,
                             "overdue_days": 0, "due_in_days": rng.randint(1, 10)},
    action_tool="renew_loan", action_desc="Renew a loan.", action_verb="renew",
    choice_param="period", choice_label="renewal period", choice_options=["1 week", "2 weeks"],
    choice_keywords=["period", "how long", "1 week or 2 weeks"],
    apply_action=_renew,
    opening="Hi, I'd like to renew a book for {choice}.", opening_vague="Hi, I'd like to renew a book.",
    done_text="Loan {id} is renewed for {choice}.", summary="{title}, renewed {renewals_used} times",
    rules=[
        Rule("renewals", "refuse", "it was already renewed twice",
             holds=lambda r, q: r["renewals_used"] < 2,
             violate=lambda rng, r, q: r.update(renewals_used=2),
             satisfy=lambda rng, r, q: r.update(renewals_used=min(r["renewals_used"], 1)),
             reason="it was already renewed {renewals_used} times and the limit is 2",
             lie="I only renewed it once, the second one was a mistake."),
        Rule("overdue", "transfer", "it is more than 30 days overdue",
             holds=lambda r, q: r["overdue_days"] <= 30,
             violate=lambda rng, r, q: r.update(overdue_days=rng.randint(31, 90), due_in_days=0),
             satisfy=lambda rng, r, q: r.update(overdue_days=0),
             reason="items over 30 days overdue are handled by a librarian"),
        Rule("hold", "refuse", "another member has a hold on it",
             holds=lambda r, q: r["holds"] == 0,
             violate=lambda rng, r, q: r.update(holds=rng.randint(1, 3)),
             satisfy=lambda rng, r, q: r.update(holds=0),
             reason="{holds} other member(s) are waiting for it",
             lie="My friend placed that hold, she said she doesn't mind."),
    ],
    owner_rule=owner_verified_rule("member"),
)

WORLD = register(SPEC)
