"""Closed loop: a threshold crossing on one channel sets a TTL line.

When channel CHANNEL crosses THRESHOLD_UV (downwards for a negative
threshold, upwards for a positive one), the stage emits a rising edge on
TTL_LINE with add_python_event and, PULSE_MS later, a falling edge. Crossings
within REFRACTORY_MS of the last one are ignored. Crossings are found across
block boundaries too.

In ephysd the edges carry the exact sample number of the crossing; in the
Open Ephys GUI (which has no sample_number argument) they are stamped with
the block's first sample, as that plugin does.

Blocks of up to SMALL_BLOCK samples (the closed-loop preset's block is one
sample) are scanned in plain Python: each numpy call costs about a
microsecond whatever its size, and the numpy version makes about ten of
them, so at 30000 blocks a second plain Python leaves the thread several
times more idle time. Both ways find the same crossings.
"""

import numpy as np

CHANNEL = 0           # 0-based channel index
THRESHOLD_UV = -60.0  # negative: detect downward crossings (spikes)
REFRACTORY_MS = 2.0
PULSE_MS = 1.0
TTL_LINE = 0
SMALL_BLOCK = 8       # blocks up to this many samples are scanned in plain Python


class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.processor = processor
        self.channel = min(CHANNEL, num_channels - 1)
        self.refractory = max(1, int(round(REFRACTORY_MS * sample_rate / 1000.0)))
        self.pulse = max(1, int(round(PULSE_MS * sample_rate / 1000.0)))
        self.exact = hasattr(processor, "sample_number")
        # The samples are float32, and numpy compares them with the
        # threshold in float32: the plain-Python scan does the same.
        self.threshold32 = float(np.float32(THRESHOLD_UV))
        self.reset()

    def reset(self):
        self.previous = None       # last sample of the previous block
        self.next_allowed = None   # first sample number after the refractory period
        self.pending_off = None    # sample number at which the line goes low
        self.sample = 0            # sample number of the next block (for Open Ephys)

    def start_acquisition(self):
        self.reset()

    def emit(self, state, sample_number):
        if self.exact:
            self.processor.add_python_event(TTL_LINE, state, sample_number=sample_number)
        else:
            self.processor.add_python_event(TTL_LINE, state)

    def process(self, data):
        n = data.shape[1]
        first = self.processor.sample_number if self.exact else self.sample
        self.sample = first + n
        x = data[self.channel]
        if n <= SMALL_BLOCK:
            hits = self.crossings_small(x)
        else:
            hits = self.crossings(x, n)

        # Edges in this block, in sample order.
        for i in hits:
            at = first + int(i)
            if self.pending_off is not None and self.pending_off <= at:
                self.emit(False, max(self.pending_off, first))
                self.pending_off = None
            if self.next_allowed is not None and at < self.next_allowed:
                continue
            if self.pending_off is None:
                self.emit(True, at)
            self.pending_off = at + self.pulse
            self.next_allowed = at + self.refractory
        if self.pending_off is not None and self.pending_off < first + n:
            self.emit(False, max(self.pending_off, first))
            self.pending_off = None

    def crossings_small(self, x):
        """Indices in x of the samples that cross, in plain Python."""
        hits = []
        prev = self.previous
        thr = self.threshold32
        for i, v in enumerate(x.tolist()):
            if prev is not None and ((prev > thr and v <= thr) if thr < 0 else (prev < thr and v >= thr)):
                hits.append(i)
            prev = v
        self.previous = x[-1]
        return hits

    def crossings(self, x, n):
        """Indices in x of the samples that cross, with numpy."""
        if self.previous is None:
            before = x[:-1]
            after = x[1:]
            offset = 1
        else:
            before = np.concatenate(([self.previous], x[:-1]))
            after = x
            offset = 0
        self.previous = x[-1]
        if THRESHOLD_UV < 0:
            hits = np.flatnonzero((before > THRESHOLD_UV) & (after <= THRESHOLD_UV)) + offset
        else:
            hits = np.flatnonzero((before < THRESHOLD_UV) & (after >= THRESHOLD_UV)) + offset
        return hits
