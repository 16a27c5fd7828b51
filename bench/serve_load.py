"""The serve load test as a script: `python bench/serve_load.py [memlm bench serve options]`.

The committed results came from:

    .venv/bin/memlm bench serve --workload mixed --clients 1,4,16,64 --max-tokens 64 --threads 2 --seconds 60 \
        --memory bench/models/chain-sum-memgen --json bench/results/serve.json --plot bench/results/serve.png
    .venv/bin/memlm bench serve --workload plain --clients 1,4,16,64 --max-tokens 64 --threads 2 --seconds 60 \
        --json bench/results/serve_plain.json --plot bench/results/serve_plain.png
"""

import sys

from memlm.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "bench", "serve", *sys.argv[1:]]
    main()
