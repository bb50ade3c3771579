"""Quotes (top of book) and status changes. On TimescaleDB the quotes table is a hypertable
(1-day chunks), compressed segmented by symbol, and retention's chunk drops take it in (the
owner's function gains a third window); nothing more on plain PostgreSQL."""

import django.db.models.deletion
import marketdata.models
import timescale.db.models.fields
from django.db import migrations, models


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from marketdata.storage import quotes_storage_setup

    quotes_storage_setup(using=schema_editor.connection.alias)


# The function as migration 0005 made it (bars and trades only), put back when this migration is undone.
RETENTION_DROP_0005_SQL = """
CREATE OR REPLACE FUNCTION marketdata_retention_drop(bars_before timestamptz, trades_before timestamptz)
RETURNS TABLE (hypertable text, symbol_id bigint, timeframe text, dropped bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    chunk regclass;
BEGIN
    FOR chunk IN SELECT show_chunks('marketdata_bar', older_than => bars_before) LOOP
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', chunk);
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, symbol_id, timeframe::text, count(*) FROM %s GROUP BY 2, 3', 'marketdata_bar', chunk);
    END LOOP;
    FOR chunk IN SELECT show_chunks('marketdata_trade', older_than => trades_before) LOOP
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', chunk);
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, symbol_id, NULL::text, count(*) FROM %s GROUP BY 2', 'marketdata_trade', chunk);
    END LOOP;
    PERFORM drop_chunks('marketdata_bar', older_than => bars_before);
    PERFORM drop_chunks('marketdata_trade', older_than => trades_before);
END
$fn$
"""


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from marketdata.storage import RETENTION_DROP_SIGNATURE, RETENTION_DROP_SIGNATURE_0005, timescaledb_enabled

    alias = schema_editor.connection.alias
    if not timescaledb_enabled(alias):
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"DROP FUNCTION IF EXISTS {RETENTION_DROP_SIGNATURE}")
        cursor.execute(RETENTION_DROP_0005_SQL)
        cursor.execute(f"REVOKE ALL ON FUNCTION {RETENTION_DROP_SIGNATURE_0005} FROM PUBLIC")


class Migration(migrations.Migration):

    dependencies = [
        ('marketdata', '0005_retention_drops_chunks'),
    ]

    operations = [
        migrations.AlterField(
            model_name='feedstatus',
            name='schema',
            field=models.CharField(choices=[('ohlcv-1s', 'ohlcv-1s'), ('ohlcv-1m', 'ohlcv-1m'), ('ohlcv-1h', 'ohlcv-1h'), ('ohlcv-1d', 'ohlcv-1d'), ('trades', 'trades'), ('mbp-1', 'mbp-1'), ('tbbo', 'tbbo'), ('bbo-1s', 'bbo-1s'), ('bbo-1m', 'bbo-1m'), ('cbbo-1s', 'cbbo-1s'), ('cbbo-1m', 'cbbo-1m'), ('status', 'status')], max_length=16),
        ),
        migrations.AlterField(
            model_name='retentionpolicy',
            name='schema',
            field=models.CharField(choices=[('ohlcv-1s', 'ohlcv-1s'), ('ohlcv-1m', 'ohlcv-1m'), ('ohlcv-1h', 'ohlcv-1h'), ('ohlcv-1d', 'ohlcv-1d'), ('trades', 'trades'), ('mbp-1', 'mbp-1'), ('tbbo', 'tbbo'), ('bbo-1s', 'bbo-1s'), ('bbo-1m', 'bbo-1m'), ('cbbo-1s', 'cbbo-1s'), ('cbbo-1m', 'cbbo-1m')], max_length=16),
        ),
        migrations.CreateModel(
            name='Quote',
            fields=[
                ('pk', models.CompositePrimaryKey('symbol', 'ts_recv', 'publisher_id', 'schema', 'sequence', 'ordinal', blank=True, editable=False, primary_key=True, serialize=False)),
                ('ts_recv', timescale.db.models.fields.TimescaleDateTimeField(interval='1 day')),
                ('ts_event', models.DateTimeField(blank=True, help_text='Empty where Databento sent none.', null=True)),
                ('publisher_id', models.IntegerField()),
                ('schema', models.SmallIntegerField(choices=[(1, 'mbp-1'), (2, 'tbbo'), (3, 'bbo-1s'), (4, 'bbo-1m'), (5, 'cbbo-1s'), (6, 'cbbo-1m')])),
                ('sequence', models.BigIntegerField(default=0, help_text="The venue's; 0 for cbbo, which carries none.")),
                ('ordinal', models.SmallIntegerField(default=0)),
                ('bid_px', models.BigIntegerField(blank=True, null=True)),
                ('ask_px', models.BigIntegerField(blank=True, null=True)),
                ('bid_sz', models.BigIntegerField(blank=True, null=True)),
                ('ask_sz', models.BigIntegerField(blank=True, null=True)),
                ('bid_ct', models.BigIntegerField(blank=True, help_text='Orders at the best bid; cbbo has none.', null=True)),
                ('ask_ct', models.BigIntegerField(blank=True, help_text='Orders at the best ask; cbbo has none.', null=True)),
                ('bid_publisher_id', models.IntegerField(blank=True, null=True)),
                ('ask_publisher_id', models.IntegerField(blank=True, null=True)),
                ('ingested_at', models.DateTimeField(db_default=marketdata.models.ClockTimestamp())),
                ('symbol', models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='marketdata.symbol')),
            ],
        ),
        migrations.CreateModel(
            name='StatusChange',
            fields=[
                ('pk', models.CompositePrimaryKey('symbol', 'ts_recv', 'publisher_id', 'ordinal', blank=True, editable=False, primary_key=True, serialize=False)),
                ('ts_recv', models.DateTimeField()),
                ('ts_event', models.DateTimeField(blank=True, null=True)),
                ('publisher_id', models.IntegerField()),
                ('ordinal', models.SmallIntegerField(default=0)),
                ('action', models.IntegerField()),
                ('reason', models.IntegerField()),
                ('trading_event', models.IntegerField()),
                ('is_trading', models.BooleanField(blank=True, null=True)),
                ('is_quoting', models.BooleanField(blank=True, null=True)),
                ('is_short_sell_restricted', models.BooleanField(blank=True, null=True)),
                ('ingested_at', models.DateTimeField(db_default=marketdata.models.ClockTimestamp())),
                ('symbol', models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='marketdata.symbol')),
            ],
        ),
        migrations.RunPython(forwards, backwards),
    ]
