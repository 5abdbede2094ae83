#!/usr/bin/env python
"""Stage 1 of the README's laion-crawl walkthrough: a shard name in, its records out.

    python -m ocf worker --project laion-crawl --stage crawl --output json -- python examples/workers/crawl.py

``ocf worker`` runs this once per job with the job's input on stdin (here a
shard name such as ``shard-00042.tar``) and takes stdout as the output
(``--output json``: parsed as JSON). A real crawler would download the
shard's URLs; this example makes up a few deterministic records so the
pipeline runs anywhere, offline. A non-zero exit (with a message on stderr)
fails the job; the tracker retries it elsewhere.
"""

import hashlib
import json
import sys


def main() -> int:
    shard = sys.stdin.read().strip()
    if not shard:
        print("crawl: empty input (expected a shard name)", file=sys.stderr)
        return 1
    digest = hashlib.sha256(shard.encode()).hexdigest()
    records = [
        {
            "url": f"https://example.org/{shard}/{i}.jpg",
            "caption": f"image {i} of {shard}",
            "bytes": int(digest[i * 4 : i * 4 + 4], 16),
        }
        for i in range(3)
    ]
    json.dump({"shard": shard, "records": records}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
