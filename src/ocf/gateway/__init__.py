"""The HTTP gateway (a Quart-Trio app on ocf's own HTTP/1.1 server), port 8092 by default."""
