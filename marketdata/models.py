"""The market-data store: symbols, bars, trades, and what operators configure."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from timescale.db.models.fields import TimescaleDateTimeField

from .timeframes import QUOTE_SCHEMAS, RETAINED_SCHEMAS, STORED_SCHEMAS, STORED_TIMEFRAMES

# Any Databento raw symbol: printable ASCII, inner spaces allowed (OPRA pads the root,
# ICE has "BRN FMJ0024!"), no leading or trailing blank. DBN allows 70 characters.
TICKER_MAX_LENGTH = 70
ticker_validator = RegexValidator(
    r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$",
    "A ticker is printable ASCII with no leading or trailing space.",
)
dataset_validator = RegexValidator(r"^[A-Z0-9]+\.[A-Z0-9]+$", "A dataset looks like XNAS.ITCH or GLBX.MDP3.")

TIMEFRAME_CHOICES = [(tf, tf) for tf in STORED_TIMEFRAMES]
SCHEMA_CHOICES = [(s, s) for s in STORED_SCHEMAS]
RETAINED_SCHEMA_CHOICES = [(s, s) for s in RETAINED_SCHEMAS]
QUOTE_SCHEMA_CHOICES = [(code, name) for name, code in QUOTE_SCHEMAS.items()]


class ClockTimestamp(models.Func):
    """PostgreSQL's clock_timestamp(): the time the row is written (volatile, unlike now())."""

    function = "clock_timestamp"
    template = "%(function)s()"
    output_field = models.DateTimeField()


class Symbol(models.Model):
    """A tradable instrument as the service names it."""

    ticker = models.CharField(max_length=TICKER_MAX_LENGTH, unique=True, validators=[ticker_validator])
    dataset = models.CharField(max_length=32, validators=[dataset_validator], db_index=True)
    active = models.BooleanField(default=True)
    description = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["ticker"]

    def __str__(self) -> str:
        return self.ticker


class InstrumentMapping(models.Model):
    """Databento instrument_id of a symbol over [valid_from, valid_until): ids change over time."""

    symbol = models.ForeignKey(Symbol, on_delete=models.CASCADE, related_name="instruments")
    instrument_id = models.BigIntegerField(validators=[MinValueValidator(0)])
    valid_from = models.DateTimeField()
    valid_until = models.DateTimeField(null=True, blank=True, help_text="Exclusive; empty means open-ended.")

    class Meta:
        ordering = ["symbol", "valid_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["symbol", "instrument_id", "valid_from"],
                name="instrument_mapping_unique",
            ),
            models.CheckConstraint(
                condition=Q(valid_until__isnull=True) | Q(valid_until__gt=models.F("valid_from")),
                name="instrument_mapping_range",
            ),
        ]
        indexes = [models.Index(fields=["instrument_id", "valid_from"], name="instrument_mapping_lookup")]

    def __str__(self) -> str:
        return f"{self.symbol} = {self.instrument_id} from {self.valid_from:%Y-%m-%d}"


class Bar(models.Model):
    """One OHLCV bar; ``ts`` is its open. Prices are Databento fixed-point (1e-9) integers."""

    pk = models.CompositePrimaryKey("symbol", "timeframe", "ts", "publisher_id")
    # No database-level foreign key: its per-row trigger would cost the ingest path
    # dearly; symbols are deactivated, not deleted, and PROTECT guards the admin.
    symbol = models.ForeignKey(
        Symbol,
        on_delete=models.PROTECT,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )
    timeframe = models.CharField(max_length=3, choices=TIMEFRAME_CHOICES)
    ts = TimescaleDateTimeField(interval="7 days")
    publisher_id = models.IntegerField()
    open = models.BigIntegerField()
    high = models.BigIntegerField()
    low = models.BigIntegerField()
    close = models.BigIntegerField()
    volume = models.BigIntegerField()
    anomalies = models.SmallIntegerField(default=0, db_default=0)
    # Volatile on purpose: with a volatile default, COPY into the table inserts row by row
    # instead of through its multi-insert buffer, whose 1,000 tuple slots per COPY are each
    # registered with and then removed from the statement's resource owner (a hash search
    # apiece, 1/4 of the server's time). Measured in bench/upsert.py's 1,000-row batches:
    # 5.1 -> 4.0 us/row of server CPU, 127,000 -> 150,000-159,000 bars/s.
    ingested_at = models.DateTimeField(db_default=ClockTimestamp())

    # Indexes: the primary key (symbol, timeframe, ts, publisher_id) serves range reads;
    # a partial index for regular market hours is created in migration 0002.

    def __str__(self) -> str:
        return f"{self.symbol_id} {self.timeframe} {self.ts:%Y-%m-%dT%H:%M:%SZ}"


class Trade(models.Model):
    """One trade print. ``ordinal`` tells apart prints that share every other key part."""

    pk = models.CompositePrimaryKey("symbol", "ts_event", "publisher_id", "sequence", "ordinal")
    symbol = models.ForeignKey(
        Symbol,
        on_delete=models.PROTECT,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )
    ts_event = TimescaleDateTimeField(interval="1 day")
    ts_recv = models.DateTimeField()
    publisher_id = models.IntegerField()
    sequence = models.BigIntegerField()
    ordinal = models.SmallIntegerField(default=0)
    price = models.BigIntegerField()
    size = models.BigIntegerField()
    side = models.CharField(max_length=1, choices=[("A", "ask"), ("B", "bid"), ("N", "none")])
    flags = models.SmallIntegerField(default=0)
    ingested_at = models.DateTimeField(db_default=ClockTimestamp())  # volatile on purpose: see Bar

    def __str__(self) -> str:
        return f"{self.symbol_id} {self.ts_event:%Y-%m-%dT%H:%M:%S.%fZ}"


class Quote(models.Model):
    """One top-of-book record (mbp-1, tbbo, bbo-1s/1m, cbbo-1s/1m) as Databento sent it.

    Keyed on ``ts_recv``: Databento's own index of these schemas, always defined (a BBO's
    ``ts_event``, the time of its last book update, is undefined before the first one and
    repeats from interval to interval). A side the book does not have (Databento's
    undefined price) is NULL in its price, size and count, never zero. ``ordinal``
    numbers records of one (symbol, publisher, schema) that share ``ts_recv`` and
    ``sequence`` (a venue packet can carry several updates).
    """

    pk = models.CompositePrimaryKey("symbol", "ts_recv", "publisher_id", "schema", "sequence", "ordinal")
    symbol = models.ForeignKey(
        Symbol,
        on_delete=models.PROTECT,
        db_constraint=False,  # as Bar: no per-row trigger on the ingest path
        db_index=False,
        related_name="+",
    )
    ts_recv = TimescaleDateTimeField(interval="1 day")
    ts_event = models.DateTimeField(null=True, blank=True, help_text="Empty where Databento sent none.")
    publisher_id = models.IntegerField()
    schema = models.SmallIntegerField(choices=QUOTE_SCHEMA_CHOICES)
    sequence = models.BigIntegerField(default=0, help_text="The venue's; 0 for cbbo, which carries none.")
    ordinal = models.SmallIntegerField(default=0)
    bid_px = models.BigIntegerField(null=True, blank=True)
    ask_px = models.BigIntegerField(null=True, blank=True)
    bid_sz = models.BigIntegerField(null=True, blank=True)
    ask_sz = models.BigIntegerField(null=True, blank=True)
    bid_ct = models.BigIntegerField(null=True, blank=True, help_text="Orders at the best bid; cbbo has none.")
    ask_ct = models.BigIntegerField(null=True, blank=True, help_text="Orders at the best ask; cbbo has none.")
    # cbbo consolidates the venues of one instrument: the venue of each side.
    bid_publisher_id = models.IntegerField(null=True, blank=True)
    ask_publisher_id = models.IntegerField(null=True, blank=True)
    ingested_at = models.DateTimeField(db_default=ClockTimestamp())  # volatile on purpose: see Bar

    def __str__(self) -> str:
        return f"{self.symbol_id} {self.ts_recv:%Y-%m-%dT%H:%M:%S.%fZ}"


class StatusChange(models.Model):
    """A change of an instrument's trading status (Databento's ``status`` schema), as sent.

    ``action``, ``reason`` and ``trading_event`` are Databento's codes (databento_dbn's
    StatusAction, StatusReason, TradingEvent); the three flags are NULL where Databento
    says it does not know.
    """

    pk = models.CompositePrimaryKey("symbol", "ts_recv", "publisher_id", "ordinal")
    symbol = models.ForeignKey(Symbol, on_delete=models.PROTECT, db_constraint=False, db_index=False, related_name="+")
    ts_recv = models.DateTimeField()
    ts_event = models.DateTimeField(null=True, blank=True)
    publisher_id = models.IntegerField()
    ordinal = models.SmallIntegerField(default=0)
    action = models.IntegerField()
    reason = models.IntegerField()
    trading_event = models.IntegerField()
    is_trading = models.BooleanField(null=True, blank=True)
    is_quoting = models.BooleanField(null=True, blank=True)
    is_short_sell_restricted = models.BooleanField(null=True, blank=True)
    ingested_at = models.DateTimeField(db_default=ClockTimestamp())

    def __str__(self) -> str:
        return f"{self.symbol_id} {self.ts_recv:%Y-%m-%dT%H:%M:%S.%fZ} action {self.action}"


class RetentionPolicy(models.Model):
    """How long a (dataset, schema) is kept, and when its chunks are compressed."""

    dataset = models.CharField(max_length=32, validators=[dataset_validator])
    schema = models.CharField(max_length=16, choices=RETAINED_SCHEMA_CHOICES)
    keep_days = models.PositiveIntegerField(default=365, validators=[MinValueValidator(1)])
    compress_after_days = models.PositiveIntegerField(default=7, validators=[MinValueValidator(1)])
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "retention policies"
        ordering = ["dataset", "schema"]
        constraints = [models.UniqueConstraint(fields=["dataset", "schema"], name="retention_policy_unique")]

    def __str__(self) -> str:
        return f"{self.dataset} {self.schema}: keep {self.keep_days} days"


class FeedStatus(models.Model):
    """What an ingester last did for a (dataset, schema): written by the ingester only."""

    dataset = models.CharField(max_length=32)
    schema = models.CharField(max_length=16, choices=SCHEMA_CHOICES)
    source = models.CharField(max_length=16, blank=True)
    last_record_ts = models.DateTimeField(null=True, blank=True)
    last_batch_at = models.DateTimeField(null=True, blank=True)
    lag_seconds = models.FloatField(null=True, blank=True, help_text="Batch commit time minus record time.")
    records_written = models.BigIntegerField(default=0)
    duplicates = models.BigIntegerField(default=0)
    skipped = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "feed status"
        ordering = ["dataset", "schema"]
        constraints = [models.UniqueConstraint(fields=["dataset", "schema"], name="feed_status_unique")]

    def __str__(self) -> str:
        return f"{self.dataset} {self.schema}"


class ApiToken(models.Model):
    """An API token; only its SHA-256 is stored, the token itself is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, editable=False, help_text="First characters, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"


class Entitlement(models.Model):
    """A user's right to a dataset's data."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="entitlements")
    dataset = models.CharField(max_length=32, validators=[dataset_validator])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["user", "dataset"]
        constraints = [models.UniqueConstraint(fields=["user", "dataset"], name="entitlement_unique")]

    def __str__(self) -> str:
        return f"{self.user} -> {self.dataset}"
