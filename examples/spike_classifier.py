"""Spike classifier: relabels the spikes it is given by their amplitude.

Spikes reach ``handle_spike`` from the stages before this one: ephysd's
spike detector, or a Python stage calling ``add_python_spike``. For each,
this stage measures the peak-to-peak amplitude on the electrode's largest
channel and emits the spike again with a sorted id (cluster) from that
amplitude::

    self.processor.add_python_spike(electrode_name, sample_number, sorted_id)

The sorted id is the number of AMPLITUDE_EDGES_UV at or below the amplitude
(0: smaller than the first edge). Without a waveform argument the new spike
carries the waveform of the spike it relabels. Both are recorded: the
detector's under ``spikes/<detector>/<electrode>/``, this stage's under
``spikes/Python_Processor-<this stage's id>.<stream>/<electrode>/``, with the
sorted ids in ``clusters.npy``. Later stages get this stage's spikes in
their ``handle_spike`` too.

On stop_acquisition the stage prints how many spikes each electrode had in
each cluster (in ephysd's log). In the Open Ephys GUI, which cannot take
spikes from Python, it only counts.
"""

import numpy as np

AMPLITUDE_EDGES_UV = [100.0, 200.0, 400.0]  # peak-to-peak, µV, ascending


class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.processor = processor
        self.can_emit = hasattr(processor, "add_python_spike")  # ephysd only
        self.edges = np.asarray(AMPLITUDE_EDGES_UV, dtype=np.float64)
        self.counts = {}

    def start_acquisition(self):
        self.counts = {}

    def handle_spike(self, source_node, electrode_name, num_channels, num_samples,
                     sample_number, sorted_id, spike_data):
        # spike_data: float32 (num_channels, num_samples), read-only, µV
        amplitude = float((spike_data.max(axis=1) - spike_data.min(axis=1)).max())
        cluster = int(np.searchsorted(self.edges, amplitude, side="right"))
        counts = self.counts.setdefault(electrode_name, [0] * (len(self.edges) + 1))
        counts[cluster] += 1
        if self.can_emit:
            self.processor.add_python_spike(electrode_name, sample_number, cluster)

    def process(self, data):
        pass

    def stop_acquisition(self):
        for electrode, counts in sorted(self.counts.items()):
            print("%s: spikes per cluster %s" % (electrode, counts))
