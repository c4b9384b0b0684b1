"""A cluster's Policy page (admins only): edit schedules, retention, exclusions and throttling,
with inline validation and a preview of the next scheduled runs."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from backups.forms_policy import PolicyForm, policy_initial
from backups.models import BackupPolicy
from backups.selectors.policies import next_runs, policy_for
from backups.services.errors import BackupError
from backups.services.policies import policy_changes_clean, policy_update, policy_values
from console.roles import ADMIN, role_required
from shards.models import Cluster

PREVIEW_RUNS = 5


def _form(request, cluster: Cluster, data=None) -> PolicyForm:
    current = policy_for(cluster)
    return PolicyForm(
        data,
        initial=policy_initial(policy_values(current)),
        validate_url=reverse("backups:policy_validate", args=[cluster.name]),
    )


def _preview(cluster: Cluster, form: PolicyForm) -> list[dict]:
    """The next runs of the form's values when they are valid, else of the stored policy."""
    policy = policy_for(cluster)
    if form.is_bound and form.is_valid():
        policy = BackupPolicy(cluster=cluster, **policy_changes_clean(form.changes()))
    return next_runs(policy, PREVIEW_RUNS)


def _render(request, cluster: Cluster, form: PolicyForm, *, saved: bool = False, status=200):
    context = {
        "cluster": cluster,
        "form": form,
        "runs": _preview(cluster, form),
        "saved": saved,
    }
    template = "backups/policy.html#policy-form" if request.htmx else "backups/policy.html"
    return render(request, template, context, status=status)


@role_required(ADMIN)
@require_http_methods(["GET", "POST"])
def policy_edit(request, cluster: str):
    target = get_object_or_404(Cluster, name=cluster)
    if request.method == "GET":
        return _render(request, target, _form(request, target))
    form = _form(request, target, request.POST)
    if not form.is_valid():
        return _render(request, target, form, status=200 if request.htmx else 400)
    try:
        _policy, diff = policy_update(
            cluster=target, actor=request.user, changes=form.changes(), source="page"
        )
    except BackupError as exc:
        form.add_error(getattr(exc, "field", None), str(exc))
        return _render(request, target, form, status=200 if request.htmx else 400)
    if request.htmx:
        return _render(request, target, _form(request, target), saved=True)
    messages.success(
        request, f"Policy of {target.name} saved." if diff else "Nothing changed in the policy."
    )
    return redirect("backups:policy", cluster=target.name)


@role_required(ADMIN)
@require_POST
def policy_validate(request, cluster: str):
    """The form re-rendered with its errors and the next runs of its values; saves nothing."""
    target = get_object_or_404(Cluster, name=cluster)
    form = _form(request, target, request.POST)
    form.is_valid()
    return render(
        request,
        "backups/policy.html#policy-form",
        {"cluster": target, "form": form, "runs": _preview(target, form), "saved": False},
    )
