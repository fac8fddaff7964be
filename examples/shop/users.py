"""The User service: users on the sharded ``users`` database, and the API-composition
endpoint that joins a user with their orders from another service's database."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .models import Order, User
from .web import body, errors, json, service


@errors
async def create_user(request: Request) -> Response:
    data = await body(request)
    user = await User(name=data["name"], email=data["email"]).save()
    return json(user.to_dict(), 201)


@errors
async def user_with_orders(request: Request) -> Response:
    user_id = int(request.path_params["user_id"])
    # Two databases (the user's shard, and orders) read concurrently: one round trip each.
    user, orders = await asyncio.gather(
        User.find_by_id(user_id).one(),
        Order.find().where(Order.user_id == user_id).order_by(Order.id).all(),
    )
    return json({**user.to_dict(), "orders": [o.to_dict() for o in orders]})


def app(sidecar: str | None = None) -> Starlette:
    routes = [
        Route("/users", create_user, methods=["POST"]),
        Route("/users/{user_id:int}", user_with_orders),
    ]
    return service(routes, ["users"], sidecar)
