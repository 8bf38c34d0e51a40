"""Adapters from third-party clients and agent frameworks to the tokenledger capture path.

Each integration is one module with its own pyproject extra, imported only when asked
for, feeding the same call rows, spans, prices and budget checks as litellm capture
(`tokenledger.Ledger.record_call` is the documented low-level entry point meanwhile).
"""
