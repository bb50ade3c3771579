"""Settings shared by every environment; environment files override a few names."""

from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF

from ops.logging import build_logging

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = environ.Env()

# GENERAL
DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env("DJANGO_SECRET_KEY", default="")
ALLOWED_HOSTS: list[str] = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
TIME_ZONE = "UTC"
USE_TZ = True
LANGUAGE_CODE = "en-us"
USE_I18N = False
ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# APPS
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "marketdata",
    "streaming",
    "ingest",
    "ops",
    "axes",
]

MIDDLEWARE = [
    "ops.middleware.RequestContextMiddleware",
    "ops.middleware.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "config.csp.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "marketdata.routers.PrimaryPinMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# DATABASE
# The backend is django-timescaledb's, subclassed so that it takes the TimescaleDB path
# only when the extension is available and preloaded, and plain PostgreSQL otherwise.
DATABASES = {
    "default": env.db_url(
        "DATABASE_URL",
        default="postgres://root@127.0.0.1:5432/marketdata",
        engine="marketdata.db",
    ),
}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
# A connection pool (psycopg_pool): under ASGI every sync view runs in a thread of its
# own, so persistent per-thread connections (CONN_MAX_AGE) pile up until PostgreSQL
# refuses clients; the pool caps them per process. The pool needs CONN_MAX_AGE = 0.
DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
    "min_size": env.int("DATABASE_POOL_MIN", default=1),
    "max_size": env.int("DATABASE_POOL_MAX", default=10),
    "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
}

# DATABASE ROUTING
# A read replica of the primary (a streaming standby): when DATABASE_REPLICA_URL is set,
# ORM reads go there and writes, the admin, auth and sessions stay on the primary
# (marketdata/routers.py). Unset, everything runs on `default`.
DATABASE_REPLICA_URL = env("DATABASE_REPLICA_URL", default="")
if DATABASE_REPLICA_URL:
    DATABASES["replica"] = {
        **env.db_url_config(DATABASE_REPLICA_URL, engine="marketdata.db"),
        "ATOMIC_REQUESTS": False,
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {"pool": dict(DATABASES["default"]["OPTIONS"]["pool"])},
    }
    DATABASE_ROUTERS = ["marketdata.routers.PrimaryReplicaRouter"]

# REDIS
REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")

# CHANNELS
# Redis pub/sub channels are global to the server, whatever database a URL names: the
# prefix keeps two deployments (or a demo and the tests) sharing one Redis apart.
CHANNELS_PREFIX = env("CHANNELS_PREFIX", default="asgi")


def channel_layers(redis_url: str, prefix: str) -> dict:
    """The pub/sub layer: one Redis SUBSCRIBE per group per process, one PUBLISH per message."""
    return {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [redis_url], "prefix": prefix},
        },
    }


CHANNEL_LAYERS = channel_layers(REDIS_URL, CHANNELS_PREFIX)

# SECURITY
# Content-Security-Policy (django-csp; config/csp.py adds the page's ws:/wss: origin and
# lets the Swagger UI page alone run its inline script). No inline script or style elsewhere.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "connect-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# STATIC
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]

# AUTH
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# CLIENT IP AND FAILED AUTHENTICATION
# The client's address (ops/clientip.py; throttles, login lockout, socket caps): the socket
# peer, unless a proxy in front sets CLIENT_IP_HEADER (e.g. "X-Forwarded-For"; empty trusts
# no header); the client is CLIENT_IP_TRUSTED_PROXIES entries from its right. API_NUM_PROXIES
# (the older name, DRF's NUM_PROXIES) still means X-Forwarded-For with that many proxies.
_num_proxies = env.int("API_NUM_PROXIES", default=0)
CLIENT_IP_HEADER = env("CLIENT_IP_HEADER", default="X-Forwarded-For" if _num_proxies else "")
CLIENT_IP_TRUSTED_PROXIES = env.int("CLIENT_IP_TRUSTED_PROXIES", default=_num_proxies or 1)
# Failed authentications (a bad API token on REST or WebSocket) per client IP, counted in
# Redis across processes (marketdata/auth_throttle.py); over it: 429 with Retry-After, or
# close 4029, before any database look-up. Empty: no limit.
AUTH_FAILURES_PER_IP = env("AUTH_FAILURES_PER_IP", default="20/min")
# Fair admission (ops/admission.py): per client IP, at most ADMISSION_IN_FLIGHT_PER_IP HTTP
# requests or WebSocket handshakes are served at once in a gateway process; up to
# ADMISSION_QUEUE_PER_IP more wait their turn, and over that: 429 with Retry-After, or close
# 4029. One flooding address then queues behind itself, not in front of everyone else.
# 1 is what kept a well-behaved client within 2x of its quiet latency under bench/abuse.py
# (4 did not: each request's Django work in a thread takes the interpreter lock from the
# event loop); raise it for many users behind one NAT address. 0: no admission control.
ADMISSION_IN_FLIGHT_PER_IP = env.int("ADMISSION_IN_FLIGHT_PER_IP", default=1)
ADMISSION_QUEUE_PER_IP = env.int("ADMISSION_QUEUE_PER_IP", default=256)
# Logins (/login/, /admin/login/): django-axes locks an IP and username pair out after
# AXES_FAILURE_LIMIT wrong passwords for AXES_COOLOFF_TIME (429, the login page saying so),
# counted in Redis through the "axes" cache (marketdata/login_lockout.py: fails open).
AUTHENTICATION_BACKENDS = [
    "marketdata.login_lockout.LoginLockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "marketdata.login_lockout.LoginAttempts"
AXES_CACHE = "axes"
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["ip_address", "username"]]
AXES_CLIENT_IP_CALLABLE = "ops.clientip.request_client_ip"
AXES_LOCKOUT_CALLABLE = "marketdata.login_lockout.lockout_response"
AXES_RESET_ON_SUCCESS = True
AXES_ENABLE_ADMIN = False  # attempts live in Redis, not in axes' tables


def caches(redis_url: str) -> dict:
    """Django's caches: per process by default; login attempts in Redis (short timeouts: it fails open)."""
    return {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "axes": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
            "KEY_PREFIX": "md:axes",
            "OPTIONS": {"socket_timeout": 0.25, "socket_connect_timeout": 0.25},
        },
    }


CACHES = caches(REDIS_URL)


# REST FRAMEWORK
# The history API (marketdata/api). Throttle rates ("N/s", "N/min", "N/hour", "N/day"; empty
# turns a scope off) are counted in Redis per principal (API token, else user) and per client
# IP, and are generous: they stop runaway clients, not charts.
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketdata.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["marketdata.api.permissions.HasApiAccess"],
    "DEFAULT_THROTTLE_CLASSES": ["marketdata.api.throttling.ApiRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "principal": env("API_THROTTLE_PRINCIPAL", default="6000/min"),
        "ip": env("API_THROTTLE_IP", default="12000/min"),
    },
    # The client IP of the "ip" scope is ops.clientip's (CLIENT_IP_HEADER above), not NUM_PROXIES.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "marketdata.api.exceptions.exception_handler",
}
# /v1/ohlcv and /v1/latest through the Redis hot cache; off only to measure what it saves.
API_HOT_CACHE = env.bool("API_HOT_CACHE", default=True)
# A read of a page also fetches the page before it into the cache in the background (docs/API.md).
API_HOT_CACHE_PREFETCH = env.bool("API_HOT_CACHE_PREFETCH", default=True)
SPECTACULAR_SETTINGS = {
    "TITLE": "Market-data gateway",
    "DESCRIPTION": (
        "History of bars and trades (REST API v1). Times are UTC; give start and end as RFC 3339 with an "
        "offset or Z, or as epoch milliseconds. Prices are exact decimals. Errors are "
        '`{"error": {"code", "message", "field"}}`.'
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# STREAMING
# Anonymous WebSocket and history access; production settings refuse to start with it on.
STREAMING_ALLOW_ANONYMOUS = env.bool("STREAMING_ALLOW_ANONYMOUS", default=False)
# INGEST
# Derive and publish in a process of its own beside the ingester's source and writer
# (ingest/publisher_hosts.py); off: in a thread of the ingester. Off in tests (a process start
# per run), whose own tests run both.
INGEST_PUBLISH_PROCESS = env.bool("INGEST_PUBLISH_PROCESS", default=True)
# A new stream's seq starts at its creation time (ms x 1000), so it never goes back when
# Redis loses its data (streaming/publish.py); off in tests, which start at 1.
STREAM_SEQ_EPOCH = env.bool("STREAM_SEQ_EPOCH", default=True)
# WebSocket gateway limits (announced to clients in `welcome`).
WS_MAX_STREAMS = env.int("WS_MAX_STREAMS", default=100)  # streams per connection
WS_MAX_MESSAGES_PER_S = env.int("WS_MAX_MESSAGES_PER_S", default=20)  # client messages; over: rate_limited
WS_RATE_CLOSE_FACTOR = env.int("WS_RATE_CLOSE_FACTOR", default=5)  # this many times over in a second: close 4029
WS_MAX_FRAME_BYTES = env.int("WS_MAX_FRAME_BYTES", default=16384)  # client frame size; over: frame_too_large
WS_AUTH_DEADLINE_S = env.float("WS_AUTH_DEADLINE_S", default=10.0)  # to send {"op":"auth"} when connected without
WS_HEARTBEAT_S = env.int("WS_HEARTBEAT_S", default=20)
WS_MAX_SNAPSHOT = env.int("WS_MAX_SNAPSHOT", default=1000)  # bars or trades in a snapshot
WS_MAX_THROTTLE_MS = env.int("WS_MAX_THROTTLE_MS", default=60000)
# Messages waiting for one client; a client whose queue overflows is closed with 4008.
WS_SEND_QUEUE = env.int("WS_SEND_QUEUE", default=2000)
# Bytes the server's socket may hold for one client before its messages wait in that queue.
WS_TRANSPORT_HIGH_BYTES = env.int("WS_TRANSPORT_HIGH_BYTES", default=256 * 1024)
# A resume further back than this many messages gets a fresh snapshot instead.
WS_MAX_RESUME = env.int("WS_MAX_RESUME", default=10000)
# Browser origins allowed to connect besides the gateway's own (scheme://host[:port],
# compared as scheme, host and port; "*" allows any). Empty: only the gateway's own origin
# as the browser sees it (the Host header, with the scheme of the request).
WS_ALLOWED_ORIGINS = env.list("WS_ALLOWED_ORIGINS", default=[])
# Concurrent sockets per user (whatever token or session it comes with), and per client IP
# for sockets without credentials, counted across gateway processes; the next one: 4029.
WS_MAX_CONNECTIONS_PER_USER = env.int("WS_MAX_CONNECTIONS_PER_USER", default=50)
WS_MAX_ANON_CONNECTIONS_PER_IP = env.int("WS_MAX_ANON_CONNECTIONS_PER_IP", default=100)
# Open sockets' credentials and entitlements are checked again at once when the access
# epoch changes (an ORM save, an admin action) and at least this often otherwise (a
# queryset update() or SQL, expiry), so a change reaches them within 5 s.
WS_ACCESS_RECHECK_S = env.float("WS_ACCESS_RECHECK_S", default=3.0)
# A stream is `stale` when no feed of its dataset has written for this long.
WS_FEED_STALE_S = env.int("WS_FEED_STALE_S", default=120)
WS_STATUS_POLL_S = env.float("WS_STATUS_POLL_S", default=2.0)

# DATABENTO
DATABENTO_API_KEY = env("DATABENTO_API_KEY", default="")
DATABENTO_LIVE_GATEWAY = env("DATABENTO_LIVE_GATEWAY", default="")

# MARKET DATA
# Days kept when no retention policy row exists for a (dataset, schema).
MARKETDATA_DEFAULT_RETENTION_DAYS = 365
# Quotes are many: their schemas keep this many days unless a policy row says otherwise.
MARKETDATA_DEFAULT_QUOTE_RETENTION_DAYS = 30
MARKETDATA_DEFAULT_COMPRESS_AFTER_DAYS = 7

# OPERATIONS
# /readyz fails when a live feed has written nothing for this long (0: not checked).
READYZ_FEED_MAX_AGE_S = env.int("READYZ_FEED_MAX_AGE_S", default=300)

# METRICS ACCESS
# Who may read /metrics (ops/views.py): with METRICS_TOKEN, requests carrying
# `Authorization: Bearer <METRICS_TOKEN>` (the ingester's INGEST_METRICS_PORT too); with
# METRICS_PORT, requests to that port of the server only (the server must listen there
# too: `-e tcp:port=9100:interface=0.0.0.0`), and nothing else is served on it. Open to
# anyone otherwise: production settings refuse that unless METRICS_PUBLIC is on (ops/checks.py).
METRICS_TOKEN = env("METRICS_TOKEN", default="")
METRICS_PORT = env.int("METRICS_PORT", default=None)
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=True)

# LOGGING
# One JSON event per line, from structlog and from the standard library alike, with the
# request id and trace id bound by ops.middleware.
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
LOGGING = build_logging(LOG_LEVEL)
