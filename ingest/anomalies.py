"""Anomaly flags set on a bar when it is written (flagged, never alerted).

- ``halt_zero_volume``: a bar with zero volume. Databento sends a bar only when there
  was trading, so a zero-volume bar marks a halt or a gap in trading (the seed's false
  alerts came from treating these as price moves).
- ``volume_spike``: volume above SPIKE_FACTOR times the symbol's rolling norm for that
  timeframe, an exponentially weighted mean of earlier volumes (span SPIKE_SPAN bars),
  once WARMUP bars have been seen. The spike itself is not folded into the norm, so one
  burst does not hide the next. Zero-volume bars do not move the norm either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marketdata.timeframes import ANOMALY_HALT_ZERO_VOLUME, ANOMALY_VOLUME_SPIKE

SPIKE_FACTOR = 8.0
SPIKE_SPAN = 30
WARMUP = 20
_ALPHA = 2.0 / (SPIKE_SPAN + 1)


@dataclass
class AnomalyDetector:
    """Keeps each (symbol, timeframe)'s volume norm and flags bars."""

    norms: dict[tuple[int, str], tuple[float, int]] = field(default_factory=dict)

    def flags(self, symbol_id: int, tf: str, volume: int) -> int:
        """Anomaly bits for this bar; updates the norm."""
        if volume == 0:
            return ANOMALY_HALT_ZERO_VOLUME
        key = (symbol_id, tf)
        mean, seen = self.norms.get(key, (0.0, 0))
        if seen >= WARMUP and volume > SPIKE_FACTOR * mean:
            return ANOMALY_VOLUME_SPIKE
        self.norms[key] = (volume if seen == 0 else mean + _ALPHA * (volume - mean), seen + 1)
        return 0
