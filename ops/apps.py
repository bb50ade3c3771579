from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "ops"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .logging import server_access_log_install

        server_access_log_install()
