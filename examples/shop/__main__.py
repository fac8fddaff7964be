"""``python -m examples.shop SERVICE --port N``: run one of the shop's services."""

from __future__ import annotations

import argparse
import importlib

import uvicorn

SERVICES = {
    "users": "users (sharded users database) and the user-with-orders composition",
    "catalog": "products and stock (inventory database)",
    "orders": "orders and payments, and the order saga's orchestrator",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.shop", description="Run one service of the example shop."
    )
    parser.add_argument("service", choices=sorted(SERVICES), help="; ".join(
        f"{name}: {what}" for name, what in SERVICES.items()
    ))  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--sidecar", help="the sidecar's URL (default: $DBSIDECAR_URL, else http://127.0.0.1:7432)"
    )
    args = parser.parse_args()
    module = importlib.import_module(f"examples.shop.{args.service}")
    uvicorn.run(module.app(args.sidecar), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
