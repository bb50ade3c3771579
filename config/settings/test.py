"""Test settings: the real PostgreSQL and Redis, fast password hashing."""

from .base import *  # noqa: F403
from .base import DATABASES, caches, channel_layers, env

DEBUG = False
SECRET_KEY = "test-INSECURE-placeholder-secret-key"  # noqa: S105 (tests only)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STREAMING_ALLOW_ANONYMOUS = env.bool("STREAMING_ALLOW_ANONYMOUS", default=True)
ALLOWED_HOSTS = ["*"]
# A Redis database of its own so tests never touch a running demo's keys.
REDIS_URL = env("TEST_REDIS_URL", default="redis://127.0.0.1:6379/15")
# Pub/sub channels ignore the Redis database: a prefix per test database keeps test runs
# of different checkouts (DATABASE_URL) on one Redis from hearing each other.
CHANNELS_PREFIX = env("CHANNELS_PREFIX", default="test." + DATABASES["default"]["NAME"])
CHANNEL_LAYERS = channel_layers(REDIS_URL, CHANNELS_PREFIX)
# Login attempts (django-axes) in the test Redis database too, which tests flush.
CACHES = caches(REDIS_URL)
# Seqs from 1, so tests can name them (tests/streaming/test_publish.py covers the epoch start).
STREAM_SEQ_EPOCH = env.bool("STREAM_SEQ_EPOCH", default=False)
# The publisher in a thread: a process start per ingest run would add seconds to each test.
# tests/ingest/test_publish_process.py runs the process host.
INGEST_PUBLISH_PROCESS = env.bool("INGEST_PUBLISH_PROCESS", default=False)
STORAGES = {
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# STATIC
# Serve from the app directories while developing; collectstatic is for production images.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
