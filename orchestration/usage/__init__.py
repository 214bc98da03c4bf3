"""LiveKit usage against the plan (issue 16).

- `plans`: the plans' numbers as data, with the date they are from;
- `figures`: the month's arithmetic, pure (minutes and their rounding, peak, projection, bill,
  thresholds);
- `store`: the SQL (minutes and peak from the rollup that the migration
  `20261201000004_usage.sql` maintains in the database, and the same minutes computed directly);
- `report`: a month's `MonthUsage` (`callflow usage`);
- `alerts`: the 80 %/100 % alerts, their bookkeeping and their emails;
- `check`: what the beat's `callflow.check_usage` runs;
- `metrics`: the Prometheus collector the `web` process registers for /metrics.
"""
