"""Request-scoped context for the audit log."""

from __future__ import annotations

from console.audit import audit_request_context


class AuditContextMiddleware:
    """Lets audit events written during a request (signals included) know its user, and
    tells them they come from the web, not from a command run by an OS user."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with audit_request_context(request):
            return self.get_response(request)
