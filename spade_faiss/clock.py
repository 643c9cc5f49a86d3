"""When: the one spelling of a timestamp in files the library writes (UTC, ISO 8601, seconds)."""

from __future__ import annotations

import datetime


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
