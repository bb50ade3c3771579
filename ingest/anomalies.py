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
        return self.flags_many(symbol_id, tf, [volume])[0]

    def flags_many(self, symbol_id: int, tf: str, volumes: list[int]) -> list[int]:
        """Anomaly bits for consecutive bars of one (symbol, timeframe), in order; updates the norm."""
        key = (symbol_id, tf)
        mean, seen = self.norms.get(key, (0.0, 0))
        out = []
        for volume in volumes:
            if volume == 0:
                out.append(ANOMALY_HALT_ZERO_VOLUME)
            elif seen >= WARMUP and volume > SPIKE_FACTOR * mean:
                out.append(ANOMALY_VOLUME_SPIKE)
            else:
                mean = volume if seen == 0 else mean + _ALPHA * (volume - mean)
                seen += 1
                out.append(0)
        if seen:
            self.norms[key] = (mean, seen)
        return out
