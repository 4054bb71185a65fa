// Package examples holds the Python modules users copy; this test runs each
// of them in the real pipeline (simulator → embedded Python → recorder) and
// checks what they do against an independent computation in Debian's Python.
package examples

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/daemon"
)

const capture = `
import os
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
NAME = os.path.splitext(os.path.basename(__file__))[0]
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.chunks = []
    def process(self, data):
        self.chunks.append(data.copy())
    def stop_acquisition(self):
        np.save(os.path.join(HERE, NAME + ".npy"), np.concatenate(self.chunks, axis=1))
`

func abs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// chain runs sim → capture_in → modules… → capture_out and returns the
// folder holding capture_in.npy / capture_out.npy and the chain.
func chain(t *testing.T, simTOML string, blockSamples int, modules ...string) (string, *daemon.Chain) {
	t.Helper()
	dir := t.TempDir()
	in := filepath.Join(dir, "capture_in.py")
	out := filepath.Join(dir, "capture_out.py")
	os.WriteFile(in, []byte(capture), 0o644)
	os.WriteFile(out, []byte(capture), 0o644)
	var doc strings.Builder
	fmt.Fprintf(&doc, "[source]\ndriver = \"sim\"\n[source.sim]\nrealtime = false\n%s\n", simTOML)
	fmt.Fprintf(&doc, "[pipeline]\nblock_samples = %d\n", blockSamples)
	fmt.Fprintf(&doc, "[recording]\nparent_directory = %q\n", filepath.Join(dir, "rec"))
	for _, m := range append(append([]string{in}, modules...), out) {
		fmt.Fprintf(&doc, "[[stage]]\nmodule = %q\n", m)
	}
	cfg, err := daemon.ParseConfig(filepath.Join(dir, "x.toml"), []byte(doc.String()))
	if err != nil {
		t.Fatal(err)
	}
	c, err := daemon.Process(context.Background(), cfg, zap.NewNop(), time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range c.Stages {
		if st := s.Status(); st.State != "running" || st.Errors != 0 {
			t.Fatalf("stage %+v", st)
		}
	}
	return dir, c
}

func python(t *testing.T, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command("/usr/bin/python3", append([]string{"-I", "-c", script}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python check: %v\n%s", err, out)
	}
	return string(out)
}

func TestTemplatePassesDataUnchanged(t *testing.T) {
	dir, _ := chain(t, "channels = 4", 30, abs(t, "template.py"))
	python(t, `
import sys, numpy as np
a = np.load(sys.argv[1] + "/capture_in.npy"); b = np.load(sys.argv[1] + "/capture_out.npy")
assert a.shape == (4, 30000) and (a == b).all()
`, dir)
}

// The band-pass output equals filtering the whole signal at once with scipy,
// for 30-sample blocks and for odd 7-sample blocks: block boundaries are
// seamless.
func TestBandpassFilterIsSeamless(t *testing.T) {
	for _, n := range []int{30, 7} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			dir, _ := chain(t, "channels = 4", n, abs(t, "bandpass_filter.py"))
			out := python(t, `
import sys, numpy as np
from scipy import signal
sys.path.insert(0, sys.argv[2])
import bandpass_filter as bp
a = np.load(sys.argv[1] + "/capture_in.npy").astype(np.float64)
b = np.load(sys.argv[1] + "/capture_out.npy")
sos = signal.butter(bp.ORDER, [bp.LOW_HZ, bp.HIGH_HZ], btype="bandpass", fs=30000.0, output="sos")
whole = signal.sosfilt(sos, a, axis=1).astype(np.float32)
err = np.abs(whole - b).max()
assert err < 1e-3, err
# it does filter: the LFP oscillations (8 and 40 Hz) are gone, high frequencies stay
spec = lambda x: np.abs(np.fft.rfft(x[0]))  # 1 Hz bins for 1 s at 30 kHz
lfp = lambda x: spec(x)[[8, 40]].sum()
hi = lambda x: spec(x)[1000:5000].mean()
assert lfp(b) < 0.01 * lfp(a), (lfp(b), lfp(a))
assert 0.8 < hi(b) / hi(a) < 1.2, (hi(b), hi(a))
print("max error", err)
`, dir, abs(t, "."))
			t.Log(strings.TrimSpace(out))
		})
	}
}

// threshold_ttl emits a rising edge at every downward crossing of the
// threshold on channel 0 (outside the refractory period) and a falling edge
// one pulse later, at exact sample numbers; checked against crossings found
// offline in the captured input.
// Blocks of 1 and 3 samples take its plain-Python scan, 30 its numpy one.
func TestThresholdTTLClosedLoop(t *testing.T) {
	for _, block := range []int{1, 3, 30} {
		t.Run(fmt.Sprintf("block%d", block), func(t *testing.T) { testThresholdTTL(t, block) })
	}
}

func testThresholdTTL(t *testing.T, block int) {
	dir, c := chain(t, "channels = 4\nspike_channels = [1, 3]\nunits = 2", block, abs(t, "threshold_ttl.py"))
	session := c.Session.Dir()
	out := python(t, `
import sys, glob, os, numpy as np
sys.path.insert(0, sys.argv[3])
import threshold_ttl as th
x = np.load(sys.argv[1] + "/capture_in.npy")[th.CHANNEL]
thr = th.THRESHOLD_UV
hits = np.flatnonzero((x[:-1] > thr) & (x[1:] <= thr)) + 1
refractory = int(round(th.REFRACTORY_MS * 30)); pulse = int(round(th.PULSE_MS * 30))
rising = []
for h in hits:
    if not rising or h >= rising[-1] + refractory:
        rising.append(int(h))
assert len(rising) >= 3, ("too few crossings to test", len(rising))
ev = glob.glob(os.path.join(sys.argv[2], "Record Node *", "experiment1", "recording1", "events", "Python_Processor-102.sim", "TTL"))[0]
sn = np.load(ev + "/sample_numbers.npy"); st = np.load(ev + "/states.npy")
line = th.TTL_LINE + 1
assert list(sn[st == line]) == rising, (list(sn[st == line])[:5], rising[:5])
assert list(sn[st == -line]) == [r + pulse for r in rising if r + pulse < len(x)], "falling edges"
print(len(rising), "crossings")
`, dir, session, abs(t, "."))
	t.Log(strings.TrimSpace(out))
}

// threshold_ttl's plain-Python scan (small blocks) and its numpy scan find
// the same edges at the same sample numbers, for every block size, on
// noise with crossings and samples exactly at the threshold; run in
// Debian's Python with a stand-in for the processor object.
func TestThresholdTTLSmallAndLargeBlocksAgree(t *testing.T) {
	out := python(t, `
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import threshold_ttl as th
class P:
    def __init__(self): self.ev = []; self.sample_number = 0
    def add_python_event(self, line, state, sample_number=None): self.ev.append((line, state, sample_number))
rng = np.random.default_rng(7)
x = rng.normal(0, 25, (3, 9000)).astype(np.float32)
x[0, rng.integers(0, 9000, 150)] = -100
x[0, rng.integers(0, 9000, 150)] = th.THRESHOLD_UV
runs = {}
for small in (th.SMALL_BLOCK, 0):
    th.SMALL_BLOCK = small
    for bs in (1, 2, 3, 7, 8, 9, 30, 1000):
        p = P(); st = th.PyProcessor(p, 3, 30000)
        for a in range(0, x.shape[1], bs):
            p.sample_number = a
            st.process(np.ascontiguousarray(x[:, a:a + bs]))
        runs[(small, bs)] = p.ev
ref = runs[(0, 30)]
bad = [k for k, v in runs.items() if v != ref]
assert not bad, ("differ from the numpy scan at block 30:", bad)
assert len(ref) > 100, len(ref)
print(len(ref), "edges in", len(runs), "runs")
`, abs(t, "."))
	t.Log(strings.TrimSpace(out))
}

// spikeEmitter is a stage that finds spikes as threshold crossings on
// channel 0 and emits each, once its waveform is complete (often a block
// later), with add_python_spike: channels 0–1, PRE samples before the
// crossing and N in all.
const spikeEmitter = `
import numpy as np
THR, PRE, N = -60.0, 8, 40
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
        self.buf = np.zeros((2, 0), np.float32)
        self.buf_first = 0
        self.pending = []
        self.next_allowed = PRE
    def process(self, data):
        first = self.p.sample_number
        if self.buf.shape[1] == 0:
            self.buf_first = first
        self.buf = np.concatenate([self.buf, data[:2]], axis=1)
        x = self.buf[0]
        start = max(1, first - self.buf_first)
        for i in np.flatnonzero((x[start - 1:-1] > THR) & (x[start:] <= THR)) + start:
            at = self.buf_first + int(i)
            if at >= self.next_allowed:
                self.pending.append(at)
                self.next_allowed = at + N
        end = self.buf_first + self.buf.shape[1]
        while self.pending and self.pending[0] - PRE + N <= end:
            at = self.pending.pop(0)
            lo = at - PRE - self.buf_first
            self.p.add_python_spike("Stereotrode 1", at, 0, self.buf[:, lo:lo + N])
        keep = 4 * N
        if self.buf.shape[1] > keep:
            self.buf_first += self.buf.shape[1] - keep
            self.buf = self.buf[:, -keep:]
`

// sim → a stage that emits spikes → spike_classifier.py → recording: the
// recording holds the emitter's spikes (sample numbers and waveforms of
// the crossings found offline in the captured input) and the classifier's
// relabelled copies (same spikes, clusters by amplitude), as numpy reads
// them; the classifier logs its counts.
func TestSpikeClassifierEndToEnd(t *testing.T) {
	emitter := filepath.Join(t.TempDir(), "emitter.py")
	if err := os.WriteFile(emitter, []byte(spikeEmitter), 0o644); err != nil {
		t.Fatal(err)
	}
	dir, c := chain(t, "channels = 4\nspike_channels = [1]\nunits = 6", 30, emitter, abs(t, "spike_classifier.py"))
	out := python(t, `
import sys, glob, os, json, numpy as np
sys.path.insert(0, sys.argv[3])
import spike_classifier as sc
THR, PRE, N = -60.0, 8, 40
x = np.load(sys.argv[1] + "/capture_in.npy")
hits, nxt = [], PRE
for i in np.flatnonzero((x[0, :-1] > THR) & (x[0, 1:] <= THR)) + 1:
    if i >= nxt:
        hits.append(int(i)); nxt = i + N
hits = [h for h in hits if h - PRE + N <= x.shape[1]]
assert len(hits) >= 5, ("too few spikes to test", len(hits))
waves = np.stack([x[:2, h - PRE:h - PRE + N] for h in hits])
with np.errstate(invalid="ignore"):
    want_i16 = np.rint(np.clip(waves / 0.195, -32768, 32767)).astype(np.int16)
amp = (waves.max(axis=2) - waves.min(axis=2)).max(axis=1)
want_clusters = np.searchsorted(np.asarray(sc.AMPLITUDE_EDGES_UV), amp, side="right")
assert len(set(want_clusters.tolist())) >= 2, ("the spikes fall in one cluster only", amp)
rec = glob.glob(os.path.join(sys.argv[2], "Record Node *", "experiment1", "recording1"))[0]
info = json.load(open(os.path.join(rec, "structure.oebin")))
entries = {e["folder"]: e for e in info["spikes"]}
assert sorted(entries) == ["Python_Processor-102.sim/Stereotrode_1/", "Python_Processor-103.sim/Stereotrode_1/"], sorted(entries)
for folder, clusters, index in (("Python_Processor-102.sim/Stereotrode_1/", [0] * len(hits), 1),
                                ("Python_Processor-103.sim/Stereotrode_1/", want_clusters.tolist(), 2)):
    e = entries[folder]
    assert e["name"] == "Stereotrode 1" and e["num_channels"] == 2 and e["sample_rate"] == 30000.0, e
    assert e["source_channels"][0]["bit_volts"] == 0.195, e
    d = os.path.join(rec, "spikes", folder)
    sn = np.load(d + "/sample_numbers.npy"); ts = np.load(d + "/timestamps.npy")
    wf = np.load(d + "/waveforms.npy"); cl = np.load(d + "/clusters.npy"); ix = np.load(d + "/electrode_indices.npy")
    assert sn.tolist() == hits, (folder, sn.tolist()[:5], hits[:5])
    assert (ts == sn / 30000.0).all(), folder
    assert wf.dtype == np.int16 and wf.shape == (len(hits), 2, N) and (wf == want_i16).all(), (folder, wf.shape)
    assert cl.dtype == np.uint16 and cl.tolist() == clusters, (folder, cl.tolist(), clusters)
    assert ix.dtype == np.uint16 and (ix == index).all(), (folder, ix)
print(len(hits), "spikes, clusters", np.bincount(want_clusters).tolist())
`, dir, c.Session.Dir(), abs(t, "."))
	t.Log(strings.TrimSpace(out))
}

// sim → ephysd's spike detector ([spikes], a tetrode) → spike_classifier.py
// → recording: the classifier relabels every detected spike (same sample
// numbers and waveforms, described like the detector's tetrode), with
// clusters from the amplitudes of the recorded waveforms.
func TestSpikeClassifierWithDetector(t *testing.T) {
	sim := "channels = 4\nspike_channels = [1]\nunits = 6\n" +
		"[spikes]\nthreshold_uv = 50.0\n[[spikes.electrode]]\nname = \"Tetrode 1\"\nchannels = [1, 2, 3, 4]\n"
	_, c := chain(t, sim, 30, abs(t, "spike_classifier.py"))
	out := python(t, `
import sys, glob, os, json, numpy as np
sys.path.insert(0, sys.argv[2])
import spike_classifier as sc
rec = glob.glob(os.path.join(sys.argv[1], "Record Node *", "experiment1", "recording1"))[0]
info = json.load(open(os.path.join(rec, "structure.oebin")))
det = [e for e in info["spikes"] if e["folder"].startswith("Spike_Detector-")]
cls = [e for e in info["spikes"] if e["folder"].startswith("Python_Processor-")]
assert len(det) == 1 and len(cls) == 1, [e["folder"] for e in info["spikes"]]
det, cls = det[0], cls[0]
assert det["name"] == cls["name"] == "Tetrode 1" and cls["folder"].endswith("/Tetrode_1/"), (det, cls)
for k in ("num_channels", "pre_peak_samples", "post_peak_samples", "source_channels"):
    assert det[k] == cls[k], (k, det[k], cls[k])
assert [c["local_index"] for c in cls["source_channels"]] == [0, 1, 2, 3], cls
load = lambda e, n: np.load(os.path.join(rec, "spikes", e["folder"], n + ".npy"))
sn = load(det, "sample_numbers")
assert len(sn) >= 5, ("too few spikes detected", len(sn))
assert load(cls, "sample_numbers").tolist() == sn.tolist()
wf = load(det, "waveforms")
assert (load(cls, "waveforms") == wf).all()
assert set(load(det, "clusters").tolist()) == {0}
uv = wf * det["source_channels"][0]["bit_volts"]
amp = (uv.max(axis=2) - uv.min(axis=2)).max(axis=1)
edges = np.asarray(sc.AMPLITUDE_EDGES_UV)
want = np.searchsorted(edges, amp, side="right")
clear = np.abs(amp[:, None] - edges[None, :]).min(axis=1) > 1.0   # quantisation moves amplitudes < 0.2 µV
got = load(cls, "clusters")
assert (got[clear] == want[clear]).all(), (got.tolist(), want.tolist())
assert clear.sum() >= len(sn) - 2
print(len(sn), "spikes relabelled, clusters", np.bincount(got).tolist())
`, c.Session.Dir(), abs(t, "."))
	t.Log(strings.TrimSpace(out))
}

// spike_counter pulses TTL line 1 when three of the detector's spikes fall
// within 10 ms: with spikes planted on a tetrode ([spikes], a fixed µV
// threshold), the recorded edges are those computed offline from the
// detector's recorded spikes, each burst stamped at the first sample of the
// block holding its last spike's last waveform sample.
func TestSpikeCounterBursts(t *testing.T) {
	sim := "channels = 8\nunits = 0\nlfp_uv = 0.0\nplant_channels = [1, 2, 3, 4]\nplant_rate = 200.0\n" +
		"[spikes]\nthreshold_uv = 50.0\n[[spikes.electrode]]\nchannels = [1, 2, 3, 4]\n"
	_, c := chain(t, sim, 30, abs(t, "spike_counter.py"))
	out := python(t, `
import sys, glob, os, json, numpy as np
from collections import defaultdict, deque
sys.path.insert(0, sys.argv[2])
import spike_counter as sc
rec = glob.glob(os.path.join(sys.argv[1], "Record Node *", "experiment1", "recording1"))[0]
info = json.load(open(os.path.join(rec, "structure.oebin")))
det = [e for e in info["spikes"] if e["folder"].startswith("Spike_Detector-")]
assert len(det) == 1 and det[0]["name"] == "Tetrode 1", info["spikes"]
sn = np.load(os.path.join(rec, "spikes", det[0]["folder"], "sample_numbers.npy"))
assert len(sn) >= 80, ("too few spikes", len(sn))
B, window, pulse = 30, int(round(sc.BURST_MS * 30)), int(round(sc.PULSE_MS * 30))
arrive = defaultdict(list)
for s in sn.tolist():
    arrive[(s + 40 - 8 - 1) // B * B].append(s)   # the block of the waveform's last sample
peaks, high_until, rising, falling = deque(), None, [], []
for first in range(0, 30000, B):
    burst = False
    for s in arrive[first]:
        peaks.append(s)
        while peaks and peaks[0] <= s - window:
            peaks.popleft()
        if len(peaks) >= sc.BURST_SPIKES:
            burst = True
            peaks.clear()
    if burst and high_until is None:
        rising.append(first); high_until = first + pulse
    if high_until is not None and high_until < first + B:
        falling.append(high_until); high_until = None
assert len(rising) >= 3, ("too few bursts to test", len(rising))
ev = glob.glob(os.path.join(rec, "events", "Python_Processor-102.sim", "TTL"))[0]
got_sn = np.load(ev + "/sample_numbers.npy"); st = np.load(ev + "/states.npy")
line = sc.TTL_LINE + 1
assert got_sn[st == line].tolist() == rising, (got_sn[st == line].tolist()[:5], rising[:5])
assert got_sn[st == -line].tolist() == falling, "falling edges"
print(len(sn), "spikes,", len(rising), "bursts")
`, c.Session.Dir(), abs(t, "."))
	t.Log(strings.TrimSpace(out))
}
