"""The `postback` command and the tools around the pipeline (embedded services, demo)."""
