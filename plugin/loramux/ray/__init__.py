"""loramux on Ray Serve: one ingress, N engine replicas, requests routed by adapter-set affinity.

* :mod:`loramux.ray.affinity`: the affinity key of a mix (Serve's multiplexed model id).
* :mod:`loramux.ray.adapter_sets`: what a key holds in a replica's pool (loads, evictions).
* :mod:`loramux.ray.engine`: the engine deployment (an AdapterPool and ``loramux serve``'s app).
* :mod:`loramux.ray.ingress`, :mod:`loramux.ray.streaming`: the HTTP front (parsing, selection, forwarding).
* :mod:`loramux.ray.metrics`: per-replica metrics and the ingress's affinity hit rate.
* :mod:`loramux.ray.app`: the application builder and ``loramux serve --ray``.

Needs the ``ray`` extra (``pip install 'loramux[ray]'``); docs/scale.md says how to run it.
"""
