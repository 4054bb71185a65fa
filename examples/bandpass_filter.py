"""Butterworth band-pass filter (scipy.signal), applied in place.

The filter state of every channel is carried from one block to the next, so
the output is the same as filtering the whole recording at once, whatever
the block length: block boundaries are seamless.

Edit the constants below to change the band.
"""

import numpy as np
from scipy import signal

LOW_HZ = 300.0    # lower edge of the pass band
HIGH_HZ = 6000.0  # upper edge (clamped below Nyquist)
ORDER = 2         # Butterworth order per edge (the band-pass has 2*ORDER poles)


class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.processor = processor
        nyquist = sample_rate / 2.0
        high = min(HIGH_HZ, 0.95 * nyquist)
        low = min(LOW_HZ, 0.5 * high)
        self.sos = signal.butter(ORDER, [low, high], btype="bandpass", fs=sample_rate, output="sos")
        self.num_channels = num_channels
        self.reset()

    def reset(self):
        # One (2-value) state per second-order section per channel, starting
        # from rest.
        self.zi = np.zeros((self.sos.shape[0], self.num_channels, 2))

    def start_acquisition(self):
        self.reset()

    def process(self, data):
        filtered, self.zi = signal.sosfilt(self.sos, data, axis=1, zi=self.zi)
        data[:] = filtered
