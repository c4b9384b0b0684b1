"""`GET /metrics`: Prometheus text for monitoring systems (DESIGN.md, command line).

Served only when SHARDVAULT_METRICS_TOKEN is set (404 otherwise, as if there were no such
page) and the request carries it as `Authorization: Bearer <token>` (401 otherwise). No
session login: a scraper has none. Each scrape builds a fresh registry around one collector,
so nothing is cached between scrapes or shared with other processes.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.http import require_GET


class _Scrape:
    """A prometheus-client collector over one scrape's metric families."""

    def collect(self):
        from backups.selectors.metrics import metric_families

        yield from metric_families()


@login_not_required
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    token = getattr(settings, "SHARDVAULT_METRICS_TOKEN", "")
    if not token:
        raise Http404("metrics are off: SHARDVAULT_METRICS_TOKEN is not set")
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
        response = HttpResponse("a valid bearer token is required\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="shardvault-metrics"'
        return response
    # Imported here, not with the URL conf: metrics are off unless a token is set, and every
    # command (system checks load the URL conf) would otherwise pay for the import.
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
