from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.shortcuts import render
from django.views.decorators.http import require_GET

from console.roles import role_required
from console.services import login_failure_record, login_success_record, login_throttled


def client_address(request) -> str:
    return request.META.get("REMOTE_ADDR", "")


class LoginView(auth_views.LoginView):
    """Django's login, throttled per user and per address; never says whether a user exists."""

    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        if login_throttled(username=username, address=client_address(request)):
            form = self.get_form()
            form.errors.clear()
            messages.error(request, "Too many failed sign-ins. Wait a minute and try again.")
            return self.render_to_response(self.get_context_data(form=form), status=429)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        login_failure_record(
            username=self.request.POST.get("username", ""), address=client_address(self.request)
        )
        return super().form_invalid(form)

    def form_valid(self, form):
        response = super().form_valid(form)
        login_success_record(user=form.get_user(), address=client_address(self.request))
        return response


@require_GET
@role_required()
def dashboard(request):
    """Each cluster's health at a glance; the running-jobs table refreshes by HTMX polling."""
    from console.selectors import dashboard_clusters, flagged_sets, running_jobs

    if request.htmx and request.GET.get("part") == "jobs":
        # The 3-second poll: only the running-jobs table, not every cluster's health again.
        return render(request, "console/dashboard.html#jobs", {"jobs": running_jobs()})
    context = {"clusters": dashboard_clusters(), "flagged": flagged_sets(), "jobs": running_jobs()}
    return render(request, "console/dashboard.html", context)
