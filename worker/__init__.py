"""The worker: turns a queued order event into a delivered, recorded postback."""
