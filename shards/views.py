"""Topology pages: thin views that parse, authorise, call one service or selector, render."""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from backups.engine.errors import KeyMaterialError
from backups.engine.mysql import Endpoint
from console.roles import OPERATOR, has_role, role_required
from shards.forms import ClusterForm, ImportForm, InstanceForm, ShardForm
from shards.models import DiscoveryRun, Instance
from shards.selectors import (
    MissingPassword,
    cluster_by_name,
    cluster_list_with_stats,
    cluster_topology,
    instance_endpoint,
    topology_export,
)
from shards.services.discovery_runs import discovery_request
from shards.services.topology import (
    TopologyError,
    cluster_create,
    cluster_update,
    instance_connection_test,
    instance_create,
    instance_update,
    shard_create,
    shard_update,
)
from shards.services.topology_import import topology_import
from shards.topology_file import (
    MAX_TOPOLOGY_BYTES,
    TopologyFileError,
    parse_topology,
    topology_too_large,
)

FORM_TEMPLATE = "shards/object_form.html"


def _done(request, url: str):
    """After a successful write: HTMX asks the browser to navigate, plain forms redirect."""
    if request.htmx:
        return HttpResponseClientRedirect(url)
    return redirect(url)


def _form_page(request, form, title: str, **extra):
    """The whole page, or only its form partial when HTMX re-renders it after an error."""
    template = f"{FORM_TEMPLATE}#form" if request.htmx else FORM_TEMPLATE
    context = {"form": form, **extra, "title": title, "action": request.path}
    return render(request, template, context)


def _submit(request, form, save: Callable[[dict], tuple[str, str]]):
    """On a valid POST, `save(cleaned_data)` calls one service and returns (message, next
    url): the message is flashed and the browser goes there. A TopologyError is shown beside
    its field. None: (re-)render the form."""
    if request.method != "POST" or not form.is_valid():
        return None
    try:
        message, url = save(form.cleaned_data)
    except TopologyError as exc:
        form.add_error(exc.field, str(exc))
        return None
    messages.success(request, message)
    return _done(request, url)


def _cluster_url(name: str) -> str:
    return reverse("shards:cluster_detail", args=[name])


@require_GET
@role_required()
def cluster_list(request):
    return render(request, "shards/cluster_list.html", {"clusters": cluster_list_with_stats()})


@require_GET
@role_required()
def cluster_detail(request, cluster: str):
    target = cluster_by_name(cluster)
    context = {
        "cluster": target,
        "can_edit": has_role(request.user, OPERATOR),
        **cluster_topology(target),
    }
    return render(request, "shards/cluster_detail.html", context)


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def cluster_create_view(request):
    form = ClusterForm(request.POST or None)

    def save(data):
        created = cluster_create(actor=request.user, **data)
        return f"Cluster {created.name} created.", _cluster_url(created.name)

    return _submit(request, form, save) or _form_page(request, form, "New cluster")


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def cluster_edit(request, cluster: str):
    target = cluster_by_name(cluster)
    initial = {"shard_key": target.shard_key, "description": target.description}
    form = ClusterForm(request.POST or None, initial=initial, editing=True)

    def save(data):
        cluster_update(actor=request.user, cluster=target, **data)
        return f"Cluster {target.name} saved.", _cluster_url(target.name)

    return _submit(request, form, save) or _form_page(
        request, form, f"Edit cluster {target.name}", cluster=target
    )


def _instance_page(request, cluster, form, instance=None):
    title = f"Edit instance {instance.name}" if instance else f"New instance in {cluster.name}"
    test_url = reverse("shards:instance_test", args=[cluster.name])
    return _form_page(request, form, title, cluster=cluster, instance=instance, test_url=test_url)


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def instance_create_view(request, cluster: str):
    target = cluster_by_name(cluster)
    form = InstanceForm(request.POST or None)

    def save(data):
        instance_create(actor=request.user, cluster=target, **data)
        return f"Instance {data['name']} added.", _cluster_url(target.name)

    return _submit(request, form, save) or _instance_page(request, target, form)


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def instance_edit(request, cluster: str, instance: str):
    target = cluster_by_name(cluster)
    obj = get_object_or_404(Instance, cluster=target, name=instance)
    form = InstanceForm(request.POST or None, initial=InstanceForm.initial_for(obj), editing=True)

    def save(data):
        data = {**data, "password": data["password"] or None}  # blank keeps the stored password
        instance_update(actor=request.user, instance=obj, **data)
        return f"Instance {obj.name} saved.", _cluster_url(target.name)

    return _submit(request, form, save) or _instance_page(request, target, form, obj)


@role_required(OPERATOR)
@require_POST
def instance_test(request, cluster: str):
    """Try the connection described by the instance form (or a stored instance); answer with a partial."""
    target = cluster_by_name(cluster)
    stored = None
    if request.POST.get("instance"):
        stored = get_object_or_404(Instance, cluster=target, name=request.POST["instance"])
    form = InstanceForm(request.POST, editing=stored is not None)
    if stored is not None and not any(k in request.POST for k in ("host", "port", "user")):
        form = None  # the "Test" button beside a stored instance
    if form is not None and not form.is_valid():
        ok = False
        message = "Fix the form first: " + " ".join(
            f"{'' if field == '__all__' else field + ': '}{' '.join(errors)}"
            for field, errors in form.errors.items()
        )
    else:
        ok, message = _connection_test(request, lambda: _endpoint_for_test(stored, form))
    return _connection_result(request, target, ok, message)


def _connection_test(
    request, endpoint: Callable[[], Endpoint], databases: list[str] | None = None
) -> tuple[bool, str]:
    """(ok, one sentence) for connecting to `endpoint()`, which may fail to find a password."""
    try:
        target = endpoint()
    except (MissingPassword, KeyMaterialError) as exc:
        return False, str(exc)
    return instance_connection_test(actor=request.user, endpoint=target, databases=databases)


def _connection_result(request, cluster, ok: bool, message: str):
    """The result partial for HTMX, else a page with a link back to the cluster."""
    context = {"ok": ok, "message": message}
    if request.htmx:
        return render(request, "shards/_connection_result.html", context)
    back = _cluster_url(cluster.name)
    return render(
        request, "shards/connection_result.html", {**context, "cluster": cluster, "back": back}
    )


def _endpoint_for_test(stored, form) -> Endpoint:
    """The form's connection; its password is the typed one, else the variable it names, else
    the stored instance's (read only when needed, so a typed password wins over an unreadable one).

    The stored password is only used when the form's host, port and user are the ones it was
    stored for (DESIGN.md): otherwise the test asks for the password again."""
    if form is None:
        return instance_endpoint(stored)
    data = form.cleaned_data
    name = stored.name if stored else data.get("name", "new instance")
    if data.get("password_env"):
        password = instance_endpoint(
            Instance(name=name, password_env=data["password_env"])
        ).password
    elif data.get("password"):
        password = data["password"]
    elif stored is not None:
        if (data["host"], int(data["port"]), data["user"]) != (
            stored.host,
            stored.port,
            stored.user,
        ):
            raise MissingPassword(
                f"Type the password to test {name} at {data['host']}:{data['port']} as "
                f"{data['user']}: a stored password is only sent to the host, port and user it "
                "was stored for."
            )
        password = instance_endpoint(stored).password
    else:
        password = ""
    return Endpoint(
        name=name,
        host=data["host"],
        port=data["port"],
        user=data["user"],
        password=password,
        tls_ca=data.get("tls_ca", ""),
        tls_verify=data.get("tls_verify", False),
    )


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def shard_create_view(request, cluster: str):
    target = cluster_by_name(cluster)
    form = ShardForm(request.POST or None, cluster=target)

    def save(data):
        shard_create(actor=request.user, cluster=target, **data)
        return f"Shard {data['name']} added.", _cluster_url(target.name)

    return _submit(request, form, save) or _form_page(
        request, form, f"New shard in {target.name}", cluster=target
    )


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def shard_edit(request, cluster: str, shard: str):
    target = cluster_by_name(cluster)
    obj = get_object_or_404(target.shards.select_related("instance"), name=shard)
    initial = {"instance": obj.instance.name, "database": obj.database}
    form = ShardForm(request.POST or None, cluster=target, initial=initial, editing=True)

    def save(data):
        shard_update(actor=request.user, shard=obj, **data)
        return f"Shard {obj.name} saved.", _cluster_url(target.name)

    return _submit(request, form, save) or _form_page(
        request, form, f"Edit shard {obj.name}", cluster=target
    )


@role_required(OPERATOR)
@require_POST
def shard_test(request, cluster: str):
    """Check that the shard form's instance answers and holds its database; answer with a partial."""
    target = cluster_by_name(cluster)
    instance = target.instances.filter(name=request.POST.get("instance", "")).first()
    database = request.POST.get("database", "")
    if instance is None:
        ok, message = False, "Choose an instance of this cluster."
    elif not database.strip():
        ok, message = False, "Enter the shard's database."
    else:
        ok, message = _connection_test(
            request, lambda: instance_endpoint(instance), databases=[database]
        )
    return _connection_result(request, target, ok, message)


@role_required(OPERATOR)
@require_POST
def discovery_start(request, cluster: str):
    target = cluster_by_name(cluster)
    run = discovery_request(cluster=target, actor=request.user)
    if request.htmx:
        return render(
            request, "shards/_discovery_status.html", {"cluster": target, "discovery": run}
        )
    messages.info(request, "Discovery queued; this page shows the results when it finishes.")
    return redirect("shards:cluster_detail", cluster=target.name)


@require_GET
@role_required()
def discovery_progress(request, cluster: str, run: int):
    """The progress partial while a discovery runs; when it ends, stop polling and refresh the grid."""
    target = cluster_by_name(cluster)
    discovery = get_object_or_404(DiscoveryRun, cluster=target, pk=run)
    if not request.htmx:
        return redirect("shards:cluster_detail", cluster=target.name)
    context = {"cluster": target, "discovery": discovery}
    if discovery.is_active:
        return render(request, "shards/_discovery_status.html", context)
    context.update(
        cluster_topology(target), refresh=True, can_edit=has_role(request.user, OPERATOR)
    )
    response = render(request, "shards/_discovery_status.html", context)
    return HttpResponseStopPolling(response.content)


@role_required(OPERATOR)
@require_http_methods(["GET", "POST"])
def topology_import_view(request):
    form = ImportForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            if upload.size > MAX_TOPOLOGY_BYTES:
                raise TopologyFileError(topology_too_large())
            text = upload.read(MAX_TOPOLOGY_BYTES + 1).decode("utf-8")
            summary = topology_import(actor=request.user, document=parse_topology(text))
        except UnicodeDecodeError:
            form.add_error("file", "The file is not UTF-8 text.")
        except (TopologyFileError, TopologyError) as exc:
            form.add_error("file", f"{upload.name}: {exc}")
        else:
            messages.success(request, f"Imported {upload.name}: {summary.as_text()}.")
            return redirect("shards:cluster_list")
    return render(request, "shards/import.html", {"form": form})


@require_GET
@role_required()
def topology_export_view(request):
    cluster = request.GET.get("cluster") or None
    if cluster is not None:
        cluster_by_name(cluster)  # 404 for an unknown cluster
    response = HttpResponse(
        topology_export(cluster_name=cluster), content_type="application/yaml; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="topology-{cluster or "all"}.yaml"'
    return response
