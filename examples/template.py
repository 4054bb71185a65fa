"""A template for an ephysd (and Open Ephys) Python stage.

Copy this file, keep the hooks you need and delete the others: only
``process`` is required. ephysd runs the module unchanged the way the Open
Ephys GUI's Python Processor plugin does:

* The module's folder is put on ``sys.path`` and the module is imported by
  its file name; it must define a class ``PyProcessor``.
* Every block of samples goes to ``process(data)``. ``data`` is a numpy
  float32 array of shape ``(num_channels, num_samples)`` that *is* the
  block's memory: change it in place (``data[:] = ...``, ``data *= 2``,
  ``data[3] = 0``) to change what is recorded. Rebinding the name ``data``
  or returning a value changes nothing. Units: µV for headstage channels.
* The number of samples may change from block to block: never assume it.
* For each TTL event in a block, ``handle_ttl_event`` runs *before*
  ``process`` of that block; so does ``handle_spike`` for spikes.
* ``self.processor.add_python_event(line, state)`` emits a TTL event on
  the stage's "Python Processor Output" channel (recorded, and available to
  later stages and TTL outputs), stamped with the block's first sample
  number. ephysd also accepts ``sample_number=`` (a sample of the current
  block, see ``self.processor.sample_number``) for an exact time stamp.
* ``print`` goes to the daemon's log, tagged with the stage's name.
* If a hook raises, ephysd logs the traceback, passes the block on
  unchanged and keeps acquiring and recording.
* Don't keep a reference to ``data`` after ``process`` returns: the same
  memory holds a later block next time. Copy what you want to keep
  (``self.last = data.copy()``).
"""

import numpy as np

import oe_pyprocessor  # provided by ephysd (and by Open Ephys)


class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        """Called on load, on reload, and when the stream's channel count or
        rate changes.

        processor: the oe_pyprocessor.PythonProcessor of this stage; keep it
            to call add_python_event.
        num_channels: int, channels in each block.
        sample_rate: float, samples per second.
        """
        self.processor = processor
        self.num_channels = num_channels
        self.sample_rate = sample_rate

    def process(self, data):
        """Required. Called for every block with at least one sample.

        data: numpy float32 array (num_channels, num_samples), modified in
            place.
        """
        pass

    def start_acquisition(self):
        """Called before acquisition starts (before the first block)."""
        pass

    def stop_acquisition(self):
        """Called after acquisition stops (after the last block)."""
        pass

    def start_recording(self, recording_dir):
        """Called before the first recorded block is processed.

        recording_dir: str, the full path of the session folder being
            recorded into (Open Ephys passes only its name).
        """
        pass

    def stop_recording(self):
        """Called before the first block that is no longer recorded."""
        pass

    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        """Called for each TTL event of a block, before process().

        source_node: int, id of the processor that produced the event (the
            source, e.g. 100, or an earlier Python stage, e.g. 101).
        channel: str, name of its event channel ("TTL Input",
            "Python Processor Output").
        sample_number: int, the sample at which the line changed.
        line: int, 0-based line number.
        state: bool, True for a rising edge.
        """
        pass

    def handle_spike(self, source_node, electrode_name, num_channels, num_samples,
                     sample_number, sorted_id, spike_data):
        """Called for each spike of a block, before process().

        spike_data: read-only numpy float32 array (num_channels, num_samples).
        """
        pass
