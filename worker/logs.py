"""structlog set-up: readable lines for a person at a terminal, JSON lines for machines.

arq and other libraries log through the standard library; their records go through the
same renderer, so a log collector never has to parse two formats.
"""

from __future__ import annotations

import logging
import sys

import structlog

LOGGER = "postback"
"""Parent of every logger of the relay's own (`postback.worker`, ...)."""


def configure(level: str = "info") -> None:
    """`level` is one of Settings.log_level's values, already checked there."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[structlog.typing.Processor] = (
        # Plain tracebacks: the rich ones print every frame's locals, a secret among them.
        [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        if sys.stderr.isatty()
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    # Libraries (arq narrates every job, pgserver every command) speak only to warn; the
    # relay's own events, under "postback", say what matters at the level asked for.
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger(LOGGER).setLevel(numeric)
