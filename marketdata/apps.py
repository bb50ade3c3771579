from django.apps import AppConfig


class MarketdataConfig(AppConfig):
    name = "marketdata"
    verbose_name = "Market data"

    def ready(self) -> None:
        from ops import health

        from .auth_throttle import rates_check
        from .selectors.feeds import feed_ages

        rates_check()  # a mistyped rate stops every process at start, not each request later
        health.database_check_add(feed_ages)  # /readyz judges the live feeds' last data
