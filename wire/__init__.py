"""The protocol the client and the sidecar share: plan and result types (``protocol``),
typed value encoding (``values``) and consistency tokens (``consistency``).

It depends on msgspec only, and imports neither ``client`` nor ``sidecar``.
"""
