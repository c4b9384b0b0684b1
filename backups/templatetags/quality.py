"""Quality on every page that shows a set: `{% load quality %}`.

* `{% set_quality_block backup_set %}` — the full block (Q badge, factors, last verification,
  problems, verify/drill buttons for operators), refreshed by HTMX while a run is active;
* `{{ backup_set.q|q_level }}` — "good" / "warn" / "bad", for a `q-<level>` CSS class;
* `{% q_badge backup_set %}` — the compact badge for list rows.
"""

from __future__ import annotations

from django import template
from django.utils.html import format_html

from backups.selectors.verification import quality_level, set_quality

register = template.Library()


@register.filter
def q_level(q):
    return quality_level(q)


@register.inclusion_tag("backups/_quality.html", takes_context=True)
def set_quality_block(context, backup_set):
    return {
        "quality": set_quality(backup_set=backup_set),
        "request": context.get("request"),
        "is_operator": context.get("is_operator", False),
        "csrf_token": context.get("csrf_token"),
    }


@register.simple_tag
def q_badge(backup_set):
    q = getattr(backup_set, "q", None)
    level = quality_level(q)
    text = "Q unverified" if q is None else f"Q {q:.4f}"
    verified = getattr(backup_set, "verified_at", None)
    title = f"last verified {verified:%Y-%m-%d %H:%M} UTC" if verified else "never verified"
    factors = [getattr(backup_set, name, None) for name in ("v_t", "v_d", "v_a")]
    if None not in factors:  # annotated by backups.selectors.verification.sets_with_quality
        title += " · T {:.4f} · D {:.4f} · A {:.4f}".format(*factors)
    return format_html(
        '<span class="pill q-{}" data-q-level="{}" title="{}">{}</span>', level, level, title, text
    )
