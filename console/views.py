from django.contrib import admin, messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.shortcuts import redirect
from django.urls import reverse

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


class AdminLoginView(LoginView):
    """`/admin/login/`: the same throttled, audited sign-in, landing on the admin's index.

    Someone signed in without the admin role sees the form (as Django's admin login shows
    it) rather than a redirect back to the admin, which would send them here again.
    """

    redirect_authenticated_user = False

    def get(self, request, *args, **kwargs):
        if admin.site.has_permission(request):
            return redirect(self.get_success_url())
        return super().get(request, *args, **kwargs)

    def get_default_redirect_url(self):
        return reverse("admin:index")


@login_not_required
def admin_login(request, extra_context=None):
    """Installed as `admin.site.login` (console.admin)."""
    return AdminLoginView.as_view()(request)
