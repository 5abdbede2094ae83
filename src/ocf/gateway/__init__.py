"""The HTTP gateway (Quart-Trio on Hypercorn), port 8092 by default."""
