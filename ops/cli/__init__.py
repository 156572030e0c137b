"""The front door for people at a terminal: the `postback` command, its demo, and the
embedded Postgres and Redis it starts when no URL is configured."""
