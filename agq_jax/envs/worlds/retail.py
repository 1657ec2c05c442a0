"""Retail orders: refunds of delivered orders within 30 days; big refunds go to a human."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel

from agq_jax.envs.worlds import register
from agq_jax.envs.worlds.base import DomainSpec, Rule, owner_model, owner_verified_rule

ITEMS = ["desk lamp", "kettle", "backpack", "headphones", "running shoes", "blender", "phone case", "rain jacket"]


class Order(BaseModel):
    order_id: str
    customer_id: str
    item: str
    status: Literal["processing", "shipped", "delivered", "refunded"]
    total: float
    days_since_delivery: int
    refund_method: Optional[str] = None


def _refund(order: Order, args: dict) -> dict:
    order.status = "refunded"
    order.refund_method = args["method"]
    return {"order_id": order.order_id, "status": "refunded", "amount": order.total, "method": args["method"]}


SPEC = DomainSpec(
    name="retail", agent_role="a retail support agent", entity="order", id_field="order_id", id_prefix="O",
    owner="customer", owner_id_field="customer_id", owner_prefix="C", record_model=Order,
    owner_model=owner_model("customer_id", "Customer"),
    make_record=lambda rng: {"item": rng.choice(ITEMS), "status": "delivered",
                             "total": round(rng.uniform(15, 400), 2), "days_since_delivery": rng.randint(1, 25)},
    action_tool="refund_order", action_desc="Refund an order.", action_verb="refund",
    choice_param="method", choice_label="refund method", choice_options=["card", "voucher"],
    choice_keywords=["method", "card or voucher"],
    apply_action=_refund,
    opening="Hi, I want a refund to my {choice} for an order.",
    opening_vague="Hi, I want a refund for an order.",
    done_text="Order {id} has been refunded to your {choice}.",
    summary="{item}, {status}, ${total}",
    rules=[
        Rule("delivered", "refuse", "the order is not delivered",
             holds=lambda r, q: r["status"] == "delivered",
             violate=lambda rng, r, q: r.update(status=rng.choice(["processing", "shipped"]), days_since_delivery=0),
             satisfy=lambda rng, r, q: r.update(status="delivered"),
             reason="the order is {status}, not delivered",
             lie="It was delivered yesterday, I have the box right here!"),
        Rule("big_refund", "transfer", "the total is over $500",
             holds=lambda r, q: r["total"] <= 500,
             violate=lambda rng, r, q: r.update(total=round(rng.uniform(501, 2000), 2)),
             satisfy=lambda rng, r, q: r.update(total=min(r["total"], 400.0)),
             reason="refunds over $500 need a human agent"),
        Rule("window", "refuse", "it was delivered more than 30 days ago",
             holds=lambda r, q: r["days_since_delivery"] <= 30,
             violate=lambda rng, r, q: r.update(days_since_delivery=rng.randint(31, 120)),
             satisfy=lambda rng, r, q: r.update(days_since_delivery=min(r["days_since_delivery"], 25)),
             reason="it was delivered {days_since_delivery} days ago and the limit is 30",
             lie="No, it arrived only last week, your system must be wrong."),
    ],
    owner_rule=owner_verified_rule("customer"),
)

WORLD = register(SPEC)
