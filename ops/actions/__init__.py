"""What both front doors do to the ledger: look deliveries up, replay and discard dead
letters, disable and enable a callback, test-fire one. The CLI and the HTTP service call
the same functions, so a filter, a refusal and a recorded action mean the same wherever
they were asked for."""
