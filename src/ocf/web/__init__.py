"""What every HTTP route of a node shares, below the gateway, the tracker and the node table.

``ocf.web`` is a leaf: it imports only :mod:`ocf.errors` and
:mod:`ocf.httpstream`. The gateway, the job tracker and the node table all
answer HTTP; if the shared helpers lived in the gateway, the tracker and the
table would import the layer that mounts them, which is the import cycle
this package exists to prevent.

* :mod:`ocf.web.asgi`: raw-ASGI request bodies, responders, ``ClientGone``;
* :mod:`ocf.web.errors`: error answers in OpenAI's shape (Quart and raw ASGI).
"""

from __future__ import annotations

from .asgi import ASGIApp, ClientGone, Receive, RequestBody, Responder, Send
from .errors import ERROR_CODE_HEADER, ERROR_CODE_NAME, asgi_error, error_response, exception_response, send_asgi_error

__all__ = [
    "ASGIApp",
    "ClientGone",
    "ERROR_CODE_HEADER",
    "ERROR_CODE_NAME",
    "Receive",
    "RequestBody",
    "Responder",
    "Send",
    "asgi_error",
    "error_response",
    "exception_response",
    "send_asgi_error",
]
