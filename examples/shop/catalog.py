"""The Product/Inventory service: products and their stock in the ``inventory`` database."""

from __future__ import annotations

from decimal import Decimal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .models import Product
from .web import body, errors, json, service


@errors
async def create_product(request: Request) -> Response:
    data = await body(request)
    product = await Product(
        sku=data["sku"], name=data["name"], price=Decimal(str(data["price"])), stock=data["stock"]
    ).save()
    return json(product.to_dict(), 201)


@errors
async def get_product(request: Request) -> Response:
    product = await Product.find_by_id(request.path_params["product_id"]).one()
    return json(product.to_dict())


def app(sidecar: str | None = None) -> Starlette:
    routes = [
        Route("/products", create_product, methods=["POST"]),
        Route("/products/{product_id:int}", get_product),
    ]
    return service(routes, ["inventory"], sidecar)
