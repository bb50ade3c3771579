"""The admin as an operator uses it: pages render, edits persist, tokens are shown once."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from marketdata.models import ApiToken, Entitlement, FeedStatus, InstrumentMapping, RetentionPolicy, Symbol
from marketdata.tokens import token_hash

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-for-tests")
    client.force_login(user)
    return user


@pytest.mark.parametrize("model", [Symbol, InstrumentMapping, RetentionPolicy, FeedStatus, ApiToken, Entitlement])
def test_changelists_and_add_pages_render_for_staff(client, staff, model, make_symbol):
    make_symbol("BRN FMJ0024!", dataset="IFEU.IMPACT")
    FeedStatus.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", records_written=5)
    meta = model._meta
    changelist = client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))
    assert changelist.status_code == 200
    add = client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_add"))
    assert add.status_code == (403 if model is FeedStatus else 200)


def test_symbol_search_filter_and_bulk_deactivate(client, staff, make_symbol):
    aapl = make_symbol("AAPL")
    make_symbol("ESH4", dataset="GLBX.MDP3")
    url = reverse("admin:marketdata_symbol_changelist")

    assert "ESH4" not in client.get(url, {"q": "AAPL"}).content.decode()
    assert "AAPL" not in client.get(url, {"dataset": "GLBX.MDP3"}).content.decode()

    response = client.post(url, {"action": "deactivate", "_selected_action": [aapl.pk]}, follow=True)
    assert "1 symbol(s) deactivated" in response.content.decode()
    assert Symbol.objects.get(pk=aapl.pk).active is False


def test_symbol_change_page_shows_instrument_mappings_inline(client, staff, make_symbol):
    symbol = make_symbol("MSFT")
    InstrumentMapping.objects.create(symbol=symbol, instrument_id=6819, valid_from="2024-01-02T00:00:00Z")
    page = client.get(reverse("admin:marketdata_symbol_change", args=[symbol.pk])).content.decode()
    assert "6819" in page


def test_retention_policy_edit_persists(client, staff):
    url = reverse("admin:marketdata_retentionpolicy_add")
    response = client.post(
        url, {"dataset": "XNAS.ITCH", "schema": "ohlcv-1m", "keep_days": 30, "compress_after_days": 3}, follow=True
    )
    assert response.status_code == 200
    policy = RetentionPolicy.objects.get(dataset="XNAS.ITCH", schema="ohlcv-1m")
    assert (policy.keep_days, policy.compress_after_days) == (30, 3)

    change = reverse("admin:marketdata_retentionpolicy_change", args=[policy.pk])
    client.post(change, {"dataset": "XNAS.ITCH", "schema": "ohlcv-1m", "keep_days": 90, "compress_after_days": 3})
    policy.refresh_from_db()
    assert policy.keep_days == 90


def test_retention_policy_rejects_zero_days(client, staff):
    url = reverse("admin:marketdata_retentionpolicy_add")
    response = client.post(url, {"dataset": "XNAS.ITCH", "schema": "trades", "keep_days": 0, "compress_after_days": 1})
    assert response.status_code == 200  # the form again, with its error
    assert "greater than or equal to 1" in response.content.decode()
    assert not RetentionPolicy.objects.exists()


def test_api_token_is_shown_once_and_stored_as_hash(client, staff):
    response = client.post(
        reverse("admin:marketdata_apitoken_add"), {"user": staff.pk, "name": "desk", "revoked": ""}, follow=True
    )
    shown = re.search(r"(mdg_[A-Za-z0-9_-]{20,})", response.content.decode())
    assert shown is not None
    token = shown.group(1)
    row = ApiToken.objects.get()
    assert row.key_hash == token_hash(token)
    assert token not in (row.prefix + row.key_hash)
    listing = client.get(reverse("admin:marketdata_apitoken_changelist")).content.decode()
    assert token not in listing


def test_feed_status_is_read_only(client, staff):
    status = FeedStatus.objects.create(dataset="XNAS.ITCH", schema="trades", last_error="decode error")
    url = reverse("admin:marketdata_feedstatus_change", args=[status.pk])
    client.post(url, {"dataset": "HACK.ED", "schema": "trades"})
    status.refresh_from_db()
    assert status.dataset == "XNAS.ITCH"


def test_admin_requires_staff(client):
    response = client.get(reverse("admin:marketdata_symbol_changelist"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_instrument_mapping_search_by_ticker_or_id(client, staff, make_symbol):
    symbol = make_symbol("MSFT")
    InstrumentMapping.objects.create(symbol=symbol, instrument_id=6819, valid_from="2024-01-02T00:00:00Z")
    url = reverse("admin:marketdata_instrumentmapping_changelist")
    assert "6819" in client.get(url, {"q": "MSFT"}).content.decode()
    assert "MSFT" in client.get(url, {"q": "6819"}).content.decode()


def test_revoking_tokens_in_the_admin_tells_every_process_at_once(client, staff, redis_client):
    from marketdata.cache.local import EPOCH_KEY
    from marketdata.services.api_tokens import api_token_create

    api_token_create(user=staff, name="desk")
    before = redis_client.get(EPOCH_KEY)
    response = client.post(
        reverse("admin:marketdata_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [t.pk for t in ApiToken.objects.all()]},
        follow=True,
    )
    assert response.status_code == 200
    assert ApiToken.objects.get().revoked
    assert redis_client.get(EPOCH_KEY) not in (None, before)  # update() sends no signal: bumped by the action
