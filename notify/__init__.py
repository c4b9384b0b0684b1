"""The one sender of mail and webhooks (knows nothing of backups models).

Callers compose what to say (`backups.services.alerts`); `send` delivers it. A mail server
or webhook that fails is logged and never breaks the caller.
"""

from notify.sender import first_time, role_emails, send

__all__ = ["first_time", "role_emails", "send"]
