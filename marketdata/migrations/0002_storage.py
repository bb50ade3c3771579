"""Storage beyond the tables: regular-hours index everywhere; on TimescaleDB, compression,
the daily_ohlcv_summary continuous aggregate and the retention/compression policies."""

from django.db import migrations


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from marketdata.storage import storage_setup

    storage_setup(using=schema_editor.connection.alias)


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from marketdata.storage import storage_teardown

    storage_teardown(using=schema_editor.connection.alias)


class Migration(migrations.Migration):
    # CREATE MATERIALIZED VIEW ... WITH (timescaledb.continuous) cannot run in a transaction.
    atomic = False

    dependencies = [("marketdata", "0001_initial")]

    operations = [migrations.RunPython(forwards, backwards)]
