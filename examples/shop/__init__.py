"""The e-commerce example: User, Product/Inventory and Order/Payment services on dbsidecar.

Each service is a small Starlette app that talks to its databases only through the
sidecar (the client in :mod:`client`). ``python -m examples.shop SERVICE --port N`` runs
one; ``examples/shop/README.md`` shows the whole shop against ``dbsidecar dev``.
"""
