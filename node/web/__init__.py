"""The node's HTTP side: the API (:mod:`.app`), STOW-RS (:mod:`.stow`), auth; /metrics renders :mod:`node.metrics`."""
