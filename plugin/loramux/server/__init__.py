"""loramux.server: ``loramux serve``, an OpenAI-compatible HTTP server on the pool's engine.

- :mod:`~loramux.server.app`: the FastAPI app (auth, health, metrics, errors); :mod:`~loramux.server.launch`
  opens the pool and router it serves.
- :mod:`~loramux.server.openai_routes`: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.
- :mod:`~loramux.server.adapter_routes`: adapter management and llama-server's ``/lora-adapters``.
- :mod:`~loramux.server.selection`: which mix a request runs under (``mix``, ``lora``, ``model``).
- :mod:`~loramux.server.hook`: ``--upstream``, the router in front of a stock llama-server.

Needs the ``serve`` extra (FastAPI, uvicorn with uvloop/httptools, httpx, prometheus-client).
"""
