"""The relay's benchmark suite: `make bench`, or `python -m bench [SCENARIO ...]`.

It measures the product as it runs in production (real Redis, real Postgres, `postback
worker` processes, a receiver in another process), never mocks, because each figure is a
claim about the deployed relay; see bench/README.md.
"""
