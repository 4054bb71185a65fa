"""Builds Open Ephys binary recordings for the playback tests.

Usage: /usr/bin/python3 -I make_recordings.py OUTDIR

OUTDIR/session/2024-01-01_10-00-00/Record Node 101/experiment1/recording1
    laid out like an Open Ephys GUI 0.6 recording: an acquisition board stream
    (3 headstage channels in uV + 2 ADC channels in V) whose sample numbers
    start at 123456 and jump over a gap, an NI-DAQ stream, TTL folders for
    both, a MessageCenter folder and settings.xml. .npy files of format 1.0,
    2.0 and 3.0. expected_*.npy hold what playback must deliver.
OUTDIR/multi/Record Node 102/experiment{1,2}/recording{1,2,10}
    several recordings (GUI 1.0.1 layout).
OUTDIR/old/recording1
    the GUI 0.5 layout: int64 timestamps.npy, TTL_1/channel_states.npy.
"""
import json
import os
import sys

import numpy as np
from numpy.lib import format as npformat


def save(path, arr, version=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        if version is None:
            np.save(f, arr)
        else:
            npformat.write_array(f, arr, version=version)


def channel(name, bit_volts, units):
    return {"channel_name": name, "description": "a channel", "identifier": "genericdata.continuous",
            "history": "Acquisition Board -> Record Node", "bit_volts": bit_volts, "units": units,
            "source_processor_index": 0, "recorded_processor_index": 0}


def words_for(sn, ev_sn, ev_states, initial):
    """The digital word at each sample: initial state, then every event at or before it."""
    order = np.argsort(ev_sn, kind="stable")
    ev_sn, ev_states = ev_sn[order], ev_states[order]
    out = np.zeros(len(sn), dtype=np.uint64)
    word, k = initial, 0
    for i, s in enumerate(sn):
        while k < len(ev_sn) and ev_sn[k] <= s:
            line = abs(int(ev_states[k])) - 1
            if ev_states[k] > 0:
                word |= 1 << line
            else:
                word &= ~(1 << line)
            k += 1
        out[i] = word
    return out


def full_words(ev_states, initial):
    word, out = initial, []
    for st in ev_states:
        line = abs(int(st)) - 1
        word = word | (1 << line) if st > 0 else word & ~(1 << line)
        out.append(word)
    return np.array(out, dtype=np.uint64)


def write_events(edir, sn, states, rate, version_states=None, version_words=None, old=False):
    sn = np.asarray(sn, dtype=np.int64)
    states = np.asarray(states, dtype=np.int16)
    if old:
        save(edir + "/channel_states.npy", states)
        save(edir + "/timestamps.npy", sn)
        save(edir + "/channels.npy", (np.abs(states)).astype(np.int16))
    else:
        save(edir + "/states.npy", states, version_states)
        save(edir + "/sample_numbers.npy", sn)
        save(edir + "/timestamps.npy", sn / rate)
    save(edir + "/full_words.npy", full_words(states, 0), version_words)


def gui_recording(rec, seed, gui_version, first=123456, n1=2500, gap=777, n2=2600):
    rng = np.random.default_rng(seed)
    os.makedirs(rec, exist_ok=True)
    rate = 30000.0
    stream = "Acquisition_Board-100.Rhythm_Data"
    hs, adc = 3, 2
    nch = hs + adc
    sn = np.concatenate([np.arange(first, first + n1), np.arange(first + n1 + gap, first + n1 + gap + n2)]).astype(np.int64)
    raw = rng.integers(-32768, 32768, size=(len(sn), nch), dtype=np.int16)
    raw[0, :] = [-32768, 32767, 0, 1, -1]
    bit_volts = np.array([0.195] * hs + [0.00015258789] * adc)
    cdir = os.path.join(rec, "continuous", stream)
    os.makedirs(cdir)
    raw.tofile(os.path.join(cdir, "continuous.dat"))
    save(cdir + "/sample_numbers.npy", sn)
    save(cdir + "/timestamps.npy", sn / rate)

    # The NI-DAQ stream: 2 channels in V at 40 kHz, its own clock.
    ni = "NI-DAQmx-102.PXI-6255"
    ni_sn = np.arange(1000, 1400, dtype=np.int64)
    ni_raw = rng.integers(-1000, 1000, size=(len(ni_sn), 2), dtype=np.int16)
    ndir = os.path.join(rec, "continuous", ni)
    os.makedirs(ndir)
    ni_raw.tofile(os.path.join(ndir, "continuous.dat"))
    save(ndir + "/sample_numbers.npy", ni_sn)
    save(ndir + "/timestamps.npy", ni_sn / 40000.0)

    # TTL events of the main stream: one before the first sample, several
    # lines at one sample, one inside the gap, one after the last sample.
    g0 = first + n1 + gap  # first sample after the gap
    ev = [
        (first - 10, +3),        # line 2 high before the recording starts
        (first, +1),             # line 0 at the first sample
        (first + 5, -1),
        (first + 5, +4),
        (first + 100, +8),       # line 7
        (first + 999, +1),
        (first + 1000, -1),      # at a block boundary
        (first + n1 + 5, -3),    # inside the gap: seen at the first sample after it
        (g0, +2),
        (g0 + 50, -8),
        (first + n1 + gap + n2 - 1, +6),  # last sample
        (first + n1 + gap + n2 + 10, +7),  # after the end: never seen
    ]
    ev_sn = np.array([e[0] for e in ev], dtype=np.int64)
    ev_states = np.array([e[1] for e in ev], dtype=np.int16)
    write_events(os.path.join(rec, "events", stream, "TTL"), ev_sn, ev_states, rate,
                 version_states=(2, 0), version_words=(3, 0))
    write_events(os.path.join(rec, "events", ni, "TTL"), [1010, 1020], [1, -1], 40000.0)
    mdir = os.path.join(rec, "events", "MessageCenter")
    save(mdir + "/text.npy", np.array([b"hello", b"stimulus on"], dtype="|S32"))
    save(mdir + "/sample_numbers.npy", np.array([first + 10, first + 20], dtype=np.int64))
    save(mdir + "/timestamps.npy", np.array([first + 10, first + 20], dtype=np.float64) / rate)

    expected = (raw.astype(np.float64) * bit_volts).astype(np.float32)
    save(rec + "/expected_data.npy", expected.T.reshape(-1))  # channel-major
    save(rec + "/expected_sample_numbers.npy", sn)
    save(rec + "/expected_words.npy", words_for(sn, ev_sn, ev_states, 0))

    ni_expected = (ni_raw.astype(np.float64) * 0.0001).astype(np.float32)
    save(rec + "/expected_ni_data.npy", ni_expected.T.reshape(-1))
    save(rec + "/expected_ni_words.npy", words_for(ni_sn, np.array([1010, 1020]), np.array([1, -1]), 0b100))

    names = ["CH%d" % (i + 1) for i in range(hs)] + ["ADC%d" % (i + 1) for i in range(adc)]
    oebin = {
        "GUI version": gui_version,
        "continuous": [
            {"folder_name": stream + "/", "sample_rate": rate, "source_processor_name": "Acquisition Board",
             "source_processor_id": 100, "stream_name": "Rhythm_Data", "recorded_processor": "Record Node",
             "recorded_processor_id": 101, "num_channels": nch,
             "channels": [channel(n, float(b), "uV" if n.startswith("CH") else "V") for n, b in zip(names, bit_volts)],
             "some_future_field": {"x": [1, 2]}},
            {"folder_name": ni + "/", "sample_rate": 40000.0, "source_processor_name": "NI-DAQmx",
             "source_processor_id": 102, "stream_name": "PXI-6255", "recorded_processor": "Record Node",
             "recorded_processor_id": 101, "num_channels": 2,
             "channels": [channel("AI%d" % i, 0.0001, "V") for i in range(2)]},
        ],
        "events": [
            {"folder_name": stream + "/TTL/", "channel_name": "Rhythm Data TTL Input", "description": "",
             "identifier": "", "sample_rate": rate, "type": "int16", "num_channels": 1,
             "source_processor": "Acquisition Board", "stream_name": "Rhythm_Data", "initial_state": 0},
            {"folder_name": ni + "/TTL/", "channel_name": "NI TTL", "description": "", "identifier": "",
             "sample_rate": 40000.0, "type": "int16", "num_channels": 1, "source_processor": "NI-DAQmx",
             "stream_name": "PXI-6255", "initial_state": 4},
            {"folder_name": "MessageCenter/", "channel_name": "Messages", "description": "", "identifier": "",
             "sample_rate": rate, "type": "string", "num_channels": 1, "source_processor": "Message Center",
             "stream_name": "Rhythm_Data"},
        ],
        "spikes": [],
    }
    with open(os.path.join(rec, "structure.oebin"), "w") as f:
        json.dump(oebin, f, indent=4)
    with open(os.path.join(rec, "sync_messages.txt"), "w", newline="") as f:
        f.write("Software Time (milliseconds since midnight Jan 1st 1970 UTC): 1704103200000\r\n")
        f.write("Start Time for Acquisition Board (100) - Rhythm_Data @ 30000 Hz: %d\r\n" % first)


def old_recording(rec):
    """GUI 0.5: int64 sample numbers in timestamps.npy, TTL_1/channel_states.npy."""
    rng = np.random.default_rng(7)
    stream = "Rhythm_FPGA-100.0"
    nch = 4
    sn = np.arange(5000, 5700, dtype=np.int64)
    raw = rng.integers(-32768, 32768, size=(len(sn), nch), dtype=np.int16)
    cdir = os.path.join(rec, "continuous", stream)
    os.makedirs(cdir)
    raw.tofile(os.path.join(cdir, "continuous.dat"))
    save(cdir + "/timestamps.npy", sn)
    ev_sn = np.array([5010, 5020, 5300], dtype=np.int64)
    ev_states = np.array([1, 5, -1], dtype=np.int16)
    write_events(os.path.join(rec, "events", stream, "TTL_1"), ev_sn, ev_states, 30000.0, old=True)
    save(rec + "/expected_data.npy", (raw.astype(np.float64) * 0.195).astype(np.float32).T.reshape(-1))
    save(rec + "/expected_sample_numbers.npy", sn)
    save(rec + "/expected_words.npy", words_for(sn, ev_sn, ev_states, 0))
    oebin = {
        "GUI version": "0.5.3",
        "continuous": [{"folder_name": stream + "/", "sample_rate": 30000.0,
                        "source_processor_name": "Rhythm FPGA", "source_processor_id": 100,
                        "source_processor_sub_idx": 0, "recorded_processor": "Rhythm FPGA",
                        "recorded_processor_id": 100, "num_channels": nch,
                        "channels": [channel("CH%d" % (i + 1), 0.195, "uV") for i in range(nch)]}],
        "events": [{"folder_name": stream + "/TTL_1/", "channel_name": "TTL input", "description": "",
                    "identifier": "", "sample_rate": 30000.0, "type": "int16", "num_channels": 8,
                    "source_processor": "Rhythm FPGA"}],
        "spikes": [],
    }
    with open(os.path.join(rec, "structure.oebin"), "w") as f:
        json.dump(oebin, f, indent=4)


def main():
    out = sys.argv[1]
    node = os.path.join(out, "session", "2024-01-01_10-00-00", "Record Node 101")
    gui_recording(os.path.join(node, "experiment1", "recording1"), 1, "0.6.7")
    with open(os.path.join(node, "settings.xml"), "w") as f:
        f.write("<SETTINGS><INFO><VERSION>0.6.7</VERSION></INFO></SETTINGS>\n")
    multi = os.path.join(out, "multi", "Record Node 102")
    for i, rel in enumerate(["experiment1/recording10", "experiment1/recording2", "experiment1/recording1",
                             "experiment2/recording1"]):
        gui_recording(os.path.join(multi, rel), 10 + i, "1.0.1", n1=300, n2=200)
    old_recording(os.path.join(out, "old", "recording1"))


if __name__ == "__main__":
    main()
