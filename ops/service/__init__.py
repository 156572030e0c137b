"""The front door over HTTP, `postback serve`: ingest for the order system, the ops API and
the ops page, `/healthz`, `/metrics` and `/openapi.json`."""
