"""What both front doors do to the ledger: look deliveries up, replay and discard dead
letters, test-fire a callback. The CLI and the HTTP service call the same functions, so a
filter, a refusal and a recorded action mean the same wherever they were asked for."""
