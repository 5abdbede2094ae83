#!/usr/bin/env python
"""Stage 2 of the README's laion-crawl walkthrough: crawled records in, one embedding per record out.

    python -m ocf worker --project laion-crawl --stage embed --output json -- python examples/workers/embed.py

The input is stage 1's output (JSON on stdin). A real worker would run a
CLIP model on a GPU; this example derives a small unit vector from each
caption's hash, so it needs nothing but Python.
"""

import hashlib
import json
import math
import sys

DIMENSIONS = 8


def embed(text: str) -> list[float]:
    raw = hashlib.sha256(text.encode()).digest()[:DIMENSIONS]
    vector = [b - 127.5 for b in raw]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 4) for v in vector]


def main() -> int:
    try:
        crawled = json.load(sys.stdin)
        records = crawled["records"]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"embed: input is not stage 1's output ({exc})", file=sys.stderr)
        return 1
    out = [{"url": r["url"], "caption": r["caption"], "embedding": embed(r["caption"])} for r in records]
    json.dump({"shard": crawled.get("shard"), "embedded": out}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
