from django.apps import AppConfig


class MarketdataConfig(AppConfig):
    name = "marketdata"
    verbose_name = "Market data"

    def ready(self) -> None:
        from .auth_throttle import rates_check

        rates_check()  # a mistyped rate stops every process at start, not each request later
