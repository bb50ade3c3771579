"""The cached answer's path: no SQL, one Redis round trip, and look-ups that never outlive a change of access."""

from __future__ import annotations

import pytest
import redis

from marketdata.cache import local, versions
from marketdata.cache import redis_client as cache_redis
from marketdata.models import ApiToken, Entitlement
from tests.marketdata.api.conftest import minute_bars

pytestmark = pytest.mark.django_db

URL = "/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z&limit=5"


@pytest.fixture
def setup(client, make_symbol, write_bars, make_user, make_token, settings):
    settings.STREAMING_ALLOW_ANONYMOUS = False
    write_bars(minute_bars(make_symbol("AAPL", dataset="XNAS.ITCH"), 10))
    user = make_user(datasets=("XNAS.ITCH",))
    token = make_token(user)
    auth = {"HTTP_AUTHORIZATION": f"Token {token}"}
    assert client.get(URL, **auth).status_code == 200  # computed, cached; token and symbol remembered
    return user, auth


@pytest.fixture
def round_trips(monkeypatch):
    calls: list[int] = []
    real = cache_redis.round_trip

    def counted(**kwargs):
        calls.append(1)
        return real(**kwargs)

    monkeypatch.setattr(cache_redis, "round_trip", counted)
    return calls


def test_a_cached_answer_costs_no_sql_and_one_redis_round_trip(client, setup, round_trips, django_assert_num_queries):
    _, auth = setup
    with django_assert_num_queries(0):
        response = client.get(URL, **auth)
    assert response.status_code == 200
    assert len(round_trips) == 1


def test_a_token_revoked_through_the_orm_is_refused_at_once(client, setup):
    user, auth = setup
    token = ApiToken.objects.get(user=user)
    token.revoked = True
    token.save()
    assert client.get(URL, **auth).status_code == 401


def test_an_entitlement_removed_is_refused_at_once(client, setup):
    user, auth = setup
    Entitlement.objects.filter(user=user).delete()
    assert client.get(URL, **auth).status_code == 404


def test_another_process_s_change_is_seen_through_the_epoch(client, setup, redis_client: redis.Redis):
    user, auth = setup
    # A change this process's signals never saw (another process, or a queryset update)...
    ApiToken.objects.filter(user=user).update(revoked=True)
    # ...that the other process announced after its commit, as marketdata.access does.
    redis_client.set(local.EPOCH_KEY, "another-process")
    assert client.get(URL, **auth).status_code == 401


def test_a_change_nobody_announced_holds_at_most_the_local_ttl(client, setup, monkeypatch):
    user, auth = setup
    ApiToken.objects.filter(user=user).update(revoked=True)  # no signal, no epoch
    assert client.get(URL, **auth).status_code == 200  # the remembered look-up, for now
    later = local._now() + local.LOCAL_TTL_S + 0.1
    monkeypatch.setattr(local, "_now", lambda: later)
    assert client.get(URL, **auth).status_code == 401


def test_an_entry_of_another_version_is_a_miss(client, setup, redis_client: redis.Redis):
    _, auth = setup
    first = client.get(URL, **auth).content
    (key,) = [k.decode() if isinstance(k, bytes) else k for k in redis_client.keys("md:cache:*")]
    # An entry computed before a version bump and stored after it (a slow reader) is never served.
    redis_client.set(key, b"0|" + b'{"forged":true}')
    redis_client.incr(versions.version_key(int(key.split(":")[2])))
    assert client.get(URL, **auth).content == first
