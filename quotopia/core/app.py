"""Core's HTTP API: quart-trio routes over a :class:`QuoteStore`.

Every response is JSON, errors included: an unknown path is a 404 JSON body, a
wrong method a 405 JSON body, never an HTML page.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from quotopia.core.store import QuoteStore

__all__ = ["create_app"]

logger = logging.getLogger("quotopia.core")


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_app(store: QuoteStore) -> QuartTrio:
    """Build the app. It only reads ``store``; the feed consumer writes it."""
    app = QuartTrio("quotopia.core")
    # No automatic OPTIONS (an empty text/html 200): OPTIONS gets the JSON 405.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No "//" → "/" redirect: routing redirects skip the error handlers (an HTML 308).
    app.url_map.merge_slashes = False

    @app.before_request
    async def refuse_a_body_too_large() -> None:
        # The routes never read a body, so Quart's MAX_CONTENT_LENGTH check never runs.
        limit = app.config["MAX_CONTENT_LENGTH"]
        if limit is not None and (request.content_length or 0) > limit:
            raise RequestEntityTooLarge()

    @app.get("/health")
    async def health() -> Response:
        return _json(
            {"status": "healthy", "time": _rfc3339(datetime.now(UTC)), "feed": store.feed_status()}
        )

    @app.get("/quotes")
    async def quotes() -> Response:
        return Response(store.quotes_json(), content_type="application/json")

    @app.get("/quotes/<symbol>")
    async def quote(symbol: str) -> Response:
        found = store.get(symbol)
        if found is None:
            return _json({"error": "not found", "symbol": symbol}, 404)
        return _json(
            {
                "symbol": found.symbol,
                "price": found.price,
                "time": None if found.time is None else _rfc3339_precise(found.time),
                "change_percent": round(found.change_percent, 4),
                "sequence": found.sequence,
                "age_seconds": round(store.age(found), 3),
            }
        )

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = error.code or 500
        body: dict[str, object] = {"error": (error.name or "error").lower(), "path": request.path}
        response = _json(body, code)
        if code == 405 and error.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
        return _json({"error": "internal server error"}, 500)

    return app


def _rfc3339_precise(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds: quote times are finer than a second."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
