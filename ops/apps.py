from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "ops"

    def ready(self) -> None:
        from .logging import server_access_log_install

        server_access_log_install()
