"""Spike counter: counts spikes per electrode and fires a TTL pulse on a burst.

Spikes come from ephysd's built-in spike detector (the ``[spikes]`` table of
the configuration; see "Spike detection" in README.md) or from an earlier
stage's ``add_python_spike``. Each reaches ``handle_spike`` before the
``process`` of the block that completes its waveform::

    handle_spike(source_node, electrode_name, num_channels, num_samples,
                 sample_number, sorted_id, spike_data)

``sample_number`` is the spike's peak; ``spike_data`` is a read-only float32
array (num_channels, num_samples) in µV.

A burst is BURST_SPIKES spikes on one electrode within BURST_MS (counted by
their peaks). On a burst the stage raises TTL_LINE for PULSE_MS; a burst while
the line is high does not extend the pulse, and the spikes of a burst do not
count towards the next one. The rising edge is stamped with the first sample
of the block in which the burst's last spike arrived (the earliest moment it
is known); the falling edge PULSE_MS later. In the Open Ephys GUI (no
``sample_number`` argument) both are stamped with their block's first sample.

On stop_acquisition the stage prints the spikes and bursts per electrode (in
ephysd's log).
"""

from collections import deque

BURST_SPIKES = 3
BURST_MS = 10.0
PULSE_MS = 1.0
TTL_LINE = 1


class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.processor = processor
        self.exact = hasattr(processor, "sample_number")  # ephysd
        self.window = max(1, int(round(BURST_MS * sample_rate / 1000.0)))
        self.pulse = max(1, int(round(PULSE_MS * sample_rate / 1000.0)))
        self.reset()

    def reset(self):
        self.counts = {}        # electrode name -> spikes
        self.bursts = {}        # electrode name -> bursts
        self.recent = {}        # electrode name -> peaks of the last spikes
        self.burst_now = False  # a burst arrived with the current block
        self.high_until = None  # sample number at which the line goes low
        self.sample = 0         # first sample of the next block (Open Ephys)

    def start_acquisition(self):
        self.reset()

    def handle_spike(self, source_node, electrode_name, num_channels, num_samples,
                     sample_number, sorted_id, spike_data):
        self.counts[electrode_name] = self.counts.get(electrode_name, 0) + 1
        peaks = self.recent.setdefault(electrode_name, deque())
        peaks.append(sample_number)
        while peaks and peaks[0] <= sample_number - self.window:
            peaks.popleft()
        if len(peaks) >= BURST_SPIKES:
            self.bursts[electrode_name] = self.bursts.get(electrode_name, 0) + 1
            peaks.clear()
            self.burst_now = True

    def emit(self, state, sample_number):
        if self.exact:
            self.processor.add_python_event(TTL_LINE, state, sample_number=sample_number)
        else:
            self.processor.add_python_event(TTL_LINE, state)

    def process(self, data):
        n = data.shape[1]
        first = self.processor.sample_number if self.exact else self.sample
        self.sample = first + n
        # The line is low at the block's start unless a pulse is running.
        if self.burst_now and self.high_until is None:
            self.emit(True, first)
            self.high_until = first + self.pulse
        if self.high_until is not None and self.high_until < first + n:
            self.emit(False, self.high_until)
            self.high_until = None
        self.burst_now = False

    def stop_acquisition(self):
        for electrode in sorted(self.counts):
            print("%s: %d spikes, %d bursts" % (electrode, self.counts[electrode], self.bursts.get(electrode, 0)))
