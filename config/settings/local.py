"""Local development: ready to use with no environment at all."""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env(
    "DJANGO_SECRET_KEY",
    default="local-INSECURE-placeholder-secret-key-never-use-in-production",
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
STREAMING_ALLOW_ANONYMOUS = env.bool("STREAMING_ALLOW_ANONYMOUS", default=True)

# STATIC
# Serve from the app directories while developing; collectstatic is for production images.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
