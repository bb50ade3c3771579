"""Retention drops TimescaleDB chunks in retention_apply, through the owner's function, and bumps the
cache versions of what it dropped; TimescaleDB's own retention policies (a background job the
hot cache never heard of) are removed. Nothing on plain PostgreSQL."""

from django.db import migrations


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from marketdata.storage import policies_sync, retention_drop_setup

    retention_drop_setup(using=schema_editor.connection.alias)
    policies_sync(using=schema_editor.connection.alias)


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from marketdata.storage import retention_drop_teardown

    retention_drop_teardown(using=schema_editor.connection.alias)


class Migration(migrations.Migration):
    dependencies = [("marketdata", "0004_trade_ingested_at_clock")]

    operations = [migrations.RunPython(forwards, backwards)]
