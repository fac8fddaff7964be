"""The Order/Payment service: places orders through the order saga, and resumes any saga
a crashed pod left unfinished (``Orchestrator.serve`` in the background)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from client import Orchestrator

from .models import Order, OrderItem, Payment
from .order_saga import ORDER_SAGA
from .web import BadRequest, body, errors, json, problem, service


class Orders:
    def __init__(self) -> None:
        self.orchestrator: Orchestrator | None = None
        self.resuming: asyncio.Task[None] | None = None

    async def started(self) -> None:
        # The lease outlives any step's timeout (10 s): a pod that dies mid-saga is
        # taken over by another once its lease ran out.
        lease = float(os.environ.get("SHOP_SAGA_LEASE", "30"))
        self.orchestrator = Orchestrator([ORDER_SAGA], log="orders", lease=lease)
        await self.orchestrator.install()
        self.resuming = asyncio.create_task(self.orchestrator.serve(interval=lease / 3))

    async def stopping(self) -> None:
        if self.resuming is not None:
            self.resuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.resuming

    @errors
    async def place(self, request: Request) -> Response:
        data = await body(request)
        items = data["items"]
        if not items or not all(int(i["quantity"]) > 0 for i in items):
            raise BadRequest("an order has items, each with a positive quantity")
        saga_id = str(uuid.uuid4())
        start = {
            "saga_id": saga_id, "user_id": int(data["user_id"]), "card": str(data["card"]),
            "items": [{"product_id": int(i["product_id"]), "quantity": int(i["quantity"])}
                      for i in items],
        }  # fmt: skip
        assert self.orchestrator is not None
        outcome = await self.orchestrator.start(ORDER_SAGA, start, saga_id)
        if outcome is None:  # cannot happen for a new id; said rather than assumed
            return problem(409, f"saga {saga_id} is run by another orchestrator")
        answer = {"saga_id": saga_id, "state": outcome.state, "error": outcome.error,
                  "order_id": outcome.data.get("order_id")}  # fmt: skip
        return json(answer, 201 if outcome.state == "completed" else 409)

    @errors
    async def get(self, request: Request) -> Response:
        order_id = int(request.path_params["order_id"])
        order, items, payments = await asyncio.gather(
            Order.find_by_id(order_id).one(),
            OrderItem.find().where(OrderItem.order_id == order_id).order_by(OrderItem.id).all(),
            Payment.find().where(Payment.order_id == order_id).all(),
        )
        return json(
            {**order.to_dict(), "items": [i.to_dict() for i in items],
             "payments": [p.to_dict() for p in payments]}
        )  # fmt: skip


def app(sidecar: str | None = None) -> Starlette:
    orders = Orders()
    routes = [
        Route("/orders", orders.place, methods=["POST"]),
        Route("/orders/{order_id:int}", orders.get),
    ]
    return service(
        routes, ["orders", "payments"], sidecar, started=orders.started, stopping=orders.stopping
    )
