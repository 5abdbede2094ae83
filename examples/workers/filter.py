#!/usr/bin/env python
"""Stage 3 of the README's laion-crawl walkthrough: embeddings in, the records worth keeping out.

    python -m ocf worker --project laion-crawl --stage filter --output json -- python examples/workers/filter.py

The input is stage 2's output (JSON on stdin). A real filter would compare
image and text embeddings against a threshold; this example keeps the
records whose first component is positive, so roughly half survive. The
last stage's outputs are the project's results (``ocf jobs results``).
"""

import json
import sys


def main() -> int:
    try:
        embedded = json.load(sys.stdin)
        rows = embedded["embedded"]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"filter: input is not stage 2's output ({exc})", file=sys.stderr)
        return 1
    kept = [{"url": r["url"], "caption": r["caption"]} for r in rows if r["embedding"][0] > 0]
    json.dump({"shard": embedded.get("shard"), "kept": kept, "dropped": len(rows) - len(kept)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
