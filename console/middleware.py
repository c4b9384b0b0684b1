"""Request-scoped context for the audit log."""

from __future__ import annotations

from django.conf import settings

from console.audit import audit_request_context


class AuditContextMiddleware:
    """Lets audit events written during a request (signals included) know its user, and
    tells them they come from the web, not from a command run by an OS user."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with audit_request_context(request):
            return self.get_response(request)


class ContentSecurityPolicyMiddleware:
    """Sends settings.CONTENT_SECURITY_POLICY on every response that has none yet."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        policy = settings.CONTENT_SECURITY_POLICY
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy
        return response
