"""The operator's admin: symbols, instrument mappings, retention, feed status, tokens, entitlements."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from .cache.local import epoch_bump
from .models import ApiToken, Entitlement, FeedStatus, InstrumentMapping, RetentionPolicy, Symbol
from .services.api_tokens import api_token_create
from .services.retention import retention_policy_save
from .services.symbols import symbols_set_active
from .storage import policies_sync


class InstrumentMappingInline(admin.TabularInline):
    model = InstrumentMapping
    extra = 0
    fields = ("instrument_id", "valid_from", "valid_until")
    ordering = ("-valid_from",)


@admin.register(Symbol)
class SymbolAdmin(admin.ModelAdmin):
    list_display = ("ticker", "dataset", "active", "description")
    list_filter = ("dataset", "active")
    search_fields = ("ticker", "description")
    list_per_page = 100
    inlines = [InstrumentMappingInline]
    actions = ["activate", "deactivate"]

    @admin.action(description="Activate selected symbols")
    def activate(self, request: HttpRequest, queryset: QuerySet[Symbol]) -> None:
        changed = symbols_set_active(symbol_ids=list(queryset.values_list("pk", flat=True)), active=True)
        self.message_user(request, f"{changed} symbol(s) activated.", messages.SUCCESS)

    @admin.action(description="Deactivate selected symbols")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Symbol]) -> None:
        changed = symbols_set_active(symbol_ids=list(queryset.values_list("pk", flat=True)), active=False)
        self.message_user(request, f"{changed} symbol(s) deactivated.", messages.SUCCESS)


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(admin.ModelAdmin):
    list_display = ("dataset", "schema", "keep_days", "compress_after_days", "updated_at")
    list_filter = ("dataset", "schema")

    def save_model(self, request: HttpRequest, obj: RetentionPolicy, form: Any, change: bool) -> None:
        applied = retention_policy_save(policy=obj)
        summary = "; ".join(
            f"{table}: keep {keep} d, compress after {comp} d" for table, (keep, comp) in applied.items()
        )
        self.message_user(request, f"Storage policies now: {summary}.", messages.INFO)

    def delete_model(self, request: HttpRequest, obj: RetentionPolicy) -> None:
        super().delete_model(request, obj)
        policies_sync()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[RetentionPolicy]) -> None:
        super().delete_queryset(request, queryset)
        policies_sync()


@admin.register(FeedStatus)
class FeedStatusAdmin(admin.ModelAdmin):
    list_display = (
        "dataset", "schema", "source", "last_record_ts", "age", "lag_seconds",
        "records_written", "duplicates", "skipped", "errors", "last_error_at",
    )  # fmt: skip
    list_filter = ("dataset", "schema")

    @admin.display(description="age of last record")
    def age(self, obj: FeedStatus) -> str:
        if obj.last_record_ts is None:
            return "-"
        seconds = (timezone.now() - obj.last_record_ts).total_seconds()
        return format_html("<span title='{}'>{}</span>", f"{seconds:.0f} s", _human(seconds))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "expires_at", "revoked")
    list_filter = ("revoked",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("user", "name", "expires_at", "revoked", "prefix", "created_at", "last_used_at")
    actions = ["revoke"]

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        row, token = api_token_create(user=obj.user, name=obj.name, expires_at=obj.expires_at)
        obj.pk = row.pk
        obj.prefix, obj.key_hash, obj.created_at = row.prefix, row.key_hash, row.created_at
        self.message_user(
            request,
            f"Token for {obj.user}: {token} (copy it now: it is shown only this once).",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = queryset.update(revoked=True)
        epoch_bump()  # update() sends no signal: tell every process to forget the tokens now
        self.message_user(request, f"{count} token(s) revoked.", messages.SUCCESS)


@admin.register(Entitlement)
class EntitlementAdmin(admin.ModelAdmin):
    list_display = ("user", "dataset", "created_at")
    list_filter = ("dataset",)
    search_fields = ("user__username", "dataset")


@admin.register(InstrumentMapping)
class InstrumentMappingAdmin(admin.ModelAdmin):
    list_display = ("instrument_id", "symbol", "valid_from", "valid_until")
    list_filter = ("symbol__dataset",)
    search_fields = ("=instrument_id", "symbol__ticker")
    list_select_related = ("symbol",)
    autocomplete_fields = ("symbol",)
